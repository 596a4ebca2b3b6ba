import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core.nn.mlp import MixFFN, Mlp, SwiGLU
from tests.core.nn.random_params import random_params


def _silu(a):
  return a / (1 + np.exp(-a))


def _dense(p, x):
  return x @ np.asarray(p["kernel"], np.float64) + (np.asarray(p["bias"]) if "bias" in p else 0)


def test_mlp_gelu_tanh(rng):
  x = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32)
  module = Mlp(64, out_features=24)
  p = random_params(module, rng, x)
  h = _dense(p["fc1"], np.asarray(x, np.float64))
  gelu = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
  np.testing.assert_allclose(module.apply({"params": p}, x), _dense(p["fc2"], gelu),
                             rtol=1e-4, atol=1e-4)


def test_swiglu(rng):
  x = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32)
  module = SwiGLU(48)
  p = random_params(module, rng, x)
  out = module.apply({"params": p}, x)
  assert out.shape == x.shape and p["fc1"]["kernel"].shape == (32, 96)
  gate, up = np.split(_dense(p["fc1"], np.asarray(x, np.float64)), 2, -1)
  np.testing.assert_allclose(out, _dense(p["fc2"], _silu(gate) * up), rtol=1e-4, atol=1e-4)


def test_mixffn_matches_loop_with_depthwise_conv(rng):
  b, h, w, d, hidden = 2, 4, 2, 32, 8
  x = jnp.asarray(rng.normal(size=(b, h * w, d)), jnp.float32)
  module = MixFFN(hidden)
  p = random_params(module, rng, x, (h, w))
  out = module.apply({"params": p}, x, (h, w))
  assert out.shape == x.shape and "bias" not in p["fc2"]

  u = _silu(_dense(p["fc1"], np.asarray(x, np.float64))).reshape(b, h, w, 2 * hidden)
  kernel = np.asarray(p["dwconv"]["kernel"], np.float64)  # [3, 3, 1, 2 * hidden]
  padded = np.pad(u, ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = np.zeros_like(u) + np.asarray(p["dwconv"]["bias"])
  for i in range(h):
    for j in range(w):
      for di in range(3):
        for dj in range(3):
          conv[:, i, j] += padded[:, i + di, j + dj] * kernel[di, dj, 0]
  a, gate = np.split(conv.reshape(b, h * w, 2 * hidden), 2, -1)
  np.testing.assert_allclose(out, _dense(p["fc2"], a * _silu(gate)), rtol=1e-4, atol=1e-4)


def test_mixffn_mixes_grid_neighbours_only(rng):
  h, w = 4, 2
  x = jnp.asarray(rng.normal(size=(1, h * w, 32)), jnp.float32)
  module = MixFFN(8)
  p = random_params(module, rng, x, (h, w))
  f = lambda x: module.apply({"params": p}, x, (h, w))
  jac = jax.jit(jax.jacobian(f))(x)[0, :, :, 0]  # [N, D, N, D]
  touches = np.abs(np.asarray(jac)).sum(axis=(1, 3)) > 0
  rows, cols = np.divmod(np.arange(h * w), w)
  neighbours = (np.abs(rows[:, None] - rows[None]) <= 1) & (np.abs(cols[:, None] - cols[None]) <= 1)
  np.testing.assert_array_equal(touches, neighbours)


def test_mixffn_grid_mismatch_is_an_error(rng):
  x = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32)
  with pytest.raises(ValueError, match=r"grid hw=\(3, 3\) has 9 cells but x has 8 tokens"):
    MixFFN(8).init(jax.random.key(0), x, (3, 3))
