import jax.numpy as jnp
import numpy as np
import pytest

from core.nn.embeddings import (ConditionEmbedder, LabelEmbedder, TimestepEmbedder, apply_rope,
                                rope_1d, rope_2d, sincos_2d, timestep_embedding)
from tests.core.nn.random_params import random_params


@pytest.mark.parametrize("dim", [16, 9])
def test_timestep_embedding_closed_form(rng, dim):
  t = rng.uniform(0, 1000, size=5)
  emb = timestep_embedding(jnp.asarray(t), dim)
  assert emb.shape == (5, dim) and emb.dtype == jnp.float32
  half = dim // 2
  args = t[:, None] * 10000.0 ** (-np.arange(half) / half)
  pad = [np.zeros((5, 1))] if dim % 2 else []
  expected = np.concatenate([np.cos(args), np.sin(args)] + pad, axis=1)
  np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-4)


def test_timestep_embedder_distinguishes_times(rng):
  # One time in each sixth of [0, 1], kept 1/30 apart: six free uniforms come closer than ~1e-7
  # (where the embeddings are within 1e-3, or the float32 times equal) in a few draws per million.
  t = jnp.asarray((np.arange(6) + rng.uniform(0.1, 0.9, size=6)) / 6)
  module = TimestepEmbedder(32)
  emb = module.apply({"params": random_params(module, rng, t)}, t)
  assert emb.shape == (6, 32)
  dists = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
  assert (dists + np.eye(6) > 1e-3).all()


def test_label_embedder_has_a_null_row(rng):
  module = LabelEmbedder(num_classes=4, features=32)
  y = jnp.asarray(rng.integers(0, 5, size=7))
  params = random_params(module, rng, y)
  assert params["embedding"].shape == (5, 32)
  np.testing.assert_array_equal(module.apply({"params": params}, y), params["embedding"][y])


def test_condition_embedder(rng):
  t = jnp.asarray(rng.uniform(size=3))
  y = jnp.asarray(rng.integers(0, 4, size=3))
  module = ConditionEmbedder(32, num_classes=4)
  params = random_params(module, rng, t, y, batch=3)
  apply = lambda t, y, batch=3: module.apply({"params": params}, t, y, batch=batch)
  np.testing.assert_array_equal(apply(t, None), apply(t, jnp.full((3,), 4)))
  assert not np.allclose(apply(t, y), apply(t, None))
  with pytest.raises(ValueError, match=r"t_B must have shape \[B\] = \(4,\)"):
    apply(t, y, batch=4)
  with pytest.raises(ValueError, match="y_B must have shape"):
    apply(t, y[:2])
  unconditional = ConditionEmbedder(32)
  with pytest.raises(ValueError, match="num_classes = 0"):
    unconditional.apply({"params": random_params(unconditional, rng, t, None, batch=3)}, t, y,
                        batch=3)


def _rotate(x_NxD, angles):
  """apply_rope on a single-head, single-batch sequence [N, D]."""
  return np.asarray(apply_rope(jnp.asarray(x_NxD)[None, :, None], angles)[0, :, 0], np.float64)


def test_rope_1d_preserves_norms_and_is_relative(rng):
  d = 16
  q, k = rng.normal(size=(2, d))
  m, n, s = rng.integers(0, 50, size=3)
  pos = jnp.asarray([m, n, m + s, n + s, *(n + 1 + np.arange(8))])
  qs = _rotate(np.tile(q, (len(pos), 1)), rope_1d(pos, d))
  ks = _rotate(np.tile(k, (len(pos), 1)), rope_1d(pos, d))
  np.testing.assert_allclose(np.linalg.norm(qs, axis=-1), np.linalg.norm(q), rtol=1e-5)
  np.testing.assert_allclose(qs[0] @ ks[1], qs[2] @ ks[3], rtol=1e-4, atol=1e-4)
  # But it does depend on the offset: q.k is not constant over offsets n-m .. n-m+8. (One offset
  # alone gives a product within 1e-3 in ~1e-3 of draws; eight in < 1e-10, extrapolated from 1e6.)
  assert np.abs(qs[0] @ ks[4:].T - qs[0] @ ks[1]).max() > 1e-3


def test_rope_2d_depends_on_dy_dx_only(rng):
  h, w, d = 5, 4, 16
  angles = rope_2d(h, w, d)
  assert angles.shape == (h * w, d // 2)
  q, k = rng.normal(size=(2, d))
  qs, ks = _rotate(np.tile(q, (h * w, 1)), angles), _rotate(np.tile(k, (h * w, 1)), angles)
  np.testing.assert_allclose(np.linalg.norm(qs, axis=-1), np.linalg.norm(q), rtol=1e-5)
  idx = lambda r, c: r * w + c  # row-major token order
  dots = qs @ ks.T
  for _ in range(10):
    (r1, r2), (c1, c2) = rng.integers(0, h, size=2), rng.integers(0, w, size=2)
    dy = rng.integers(-min(r1, r2), h - max(r1, r2))  # a shift that keeps both inside the grid
    dx = rng.integers(-min(c1, c2), w - max(c1, c2))
    np.testing.assert_allclose(dots[idx(r1, c1), idx(r2, c2)],
                               dots[idx(r1 + dy, c1 + dx), idx(r2 + dy, c2 + dx)],
                               rtol=1e-4, atol=1e-4)
  # Half the head dim turns with the row, the other half with the column.
  row_dims = np.r_[0:d // 4, d // 2:3 * d // 4]
  col_dims = np.r_[d // 4:d // 2, 3 * d // 4:d]
  np.testing.assert_allclose(qs[idx(3, 1), col_dims], qs[idx(0, 1), col_dims], rtol=1e-5)
  np.testing.assert_allclose(qs[idx(2, 3), row_dims], qs[idx(2, 0), row_dims], rtol=1e-5)
  assert not np.allclose(qs[idx(3, 1), row_dims], qs[idx(0, 1), row_dims])


def test_apply_rope_batched_angles_and_shape_errors(rng):
  x = jnp.asarray(rng.normal(size=(2, 6, 3, 8)), jnp.bfloat16)
  pos = jnp.asarray(rng.integers(0, 100, size=(2, 6)))
  out = apply_rope(x, rope_1d(pos, 8))
  assert out.shape == x.shape and out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out[1], apply_rope(x[1:], rope_1d(pos[1], 8))[0])
  with pytest.raises(ValueError, match="rope angles must have shape"):
    apply_rope(x, rope_1d(pos, 4))
  with pytest.raises(ValueError, match="divisible by 4"):
    rope_2d(2, 2, 6)


def test_sincos_2d_rows_and_columns():
  h, w, d = 3, 5, 16
  emb = np.asarray(sincos_2d(h, w, d)).reshape(h, w, d)
  rows, cols = emb[..., :d // 2], emb[..., d // 2:]
  np.testing.assert_array_equal(rows, np.broadcast_to(rows[:, :1], rows.shape))  # row index only
  np.testing.assert_array_equal(cols, np.broadcast_to(cols[:1], cols.shape))  # column index only
  flat = emb.reshape(h * w, d)
  dists = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
  assert (dists + np.eye(h * w) > 1e-3).all()
  np.testing.assert_allclose(emb[2, 0, :d // 2], timestep_embedding(jnp.asarray([2.0]), d // 2)[0])
