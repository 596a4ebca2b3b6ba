"""VDE's velocity decomposition and fixed schedule (flowrl/cache/vde.py)."""
import jax.numpy as jnp
import numpy as np
import pytest

from flowrl.cache import vde


def _f32(a):
  """a rounded to float32 (as float64): the float64 references see what decompose sees."""
  return np.asarray(a, np.float32).astype(np.float64)


def test_decompose_reconstructs_v_with_a_unit_direction_orthogonal_to_x(rng):
  flat = lambda a: np.asarray(a, np.float64).reshape(4, -1)
  x = _f32(rng.normal(size=(4, 5, 3, 2)))
  # v = alpha x + beta ||x|| u with |alpha|, beta in [1/2, 2] and u a random unit direction orthogonal
  # to x. With alpha drawn near 0 (v = noise + N(0, 1) x), rtol on alpha failed 1 draw in 400; here
  # float32's error in alpha and beta stays below 30 ulp (1 + beta / |alpha|) < 1e-5 relative.
  noise = flat(rng.normal(size=x.shape))
  r = noise - (np.sum(noise * flat(x), 1) / np.sum(flat(x) ** 2, 1))[:, None] * flat(x)
  scale_alpha = rng.uniform(0.5, 2, (4, 1)) * rng.choice([-1.0, 1.0], (4, 1))
  scale_beta = rng.uniform(0.5, 2, (4, 1)) * np.linalg.norm(flat(x), axis=1, keepdims=True)
  v = _f32((scale_alpha * flat(x) + scale_beta * r / np.linalg.norm(r, axis=1, keepdims=True))
           .reshape(x.shape))
  alpha, beta, u = vde.decompose(jnp.asarray(v), jnp.asarray(x))
  assert alpha.shape == beta.shape == (4,) and u.shape == x.shape
  np.testing.assert_allclose(np.linalg.norm(flat(u), axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.sum(flat(u) * flat(x), axis=1), 0.0, atol=1e-4)
  # Against the closed form in float64.
  alpha_ref = np.sum(flat(v) * flat(x), 1) / np.sum(flat(x) ** 2, 1)
  r = flat(v) - alpha_ref[:, None] * flat(x)
  np.testing.assert_allclose(alpha, alpha_ref, rtol=1e-5)
  np.testing.assert_allclose(beta, np.linalg.norm(r, axis=1) / np.linalg.norm(flat(x), axis=1), rtol=1e-5)
  np.testing.assert_allclose(vde.recompose(alpha, beta, u, jnp.asarray(x, jnp.float32)), v, rtol=1e-4,
                             atol=1e-5)


def test_decompose_of_a_velocity_parallel_to_x_has_no_direction(rng):
  x = rng.normal(size=(3, 7))
  # Powers of two (and 0) keep v = scale x exactly parallel in floating point: r is exactly 0.
  scale = rng.choice([-4.0, -0.5, 0.0, 0.5, 2.0], size=(3, 1))
  alpha, beta, u = vde.decompose(jnp.asarray(scale * x), jnp.asarray(x))
  np.testing.assert_allclose(alpha, scale[:, 0], rtol=1e-5)
  np.testing.assert_array_equal(beta, 0.0)
  np.testing.assert_array_equal(u, 0.0)
  np.testing.assert_allclose(vde.recompose(alpha, beta, u, jnp.asarray(x, jnp.float32)), scale * x,
                             rtol=1e-5)


def test_decompose_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="share a shape"):
    vde.decompose(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


def test_extrapolate_is_exact_on_a_line(rng):
  a, b, t = rng.normal(size=3)
  t0 = rng.normal()
  t1 = t0 + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.5)   # anchors apart: a bounded lever
  line = lambda s: a + b * s
  # line(t) may be near 0, so rtol alone is not enough: float64 rounds the extrapolation to within
  # ~10 ulp of |f| (1 + |t - t1| / |t1 - t0|), far below atol.
  lever = 1 + abs(t - t1) / abs(t1 - t0)
  atol = 1e-12 * (abs(line(t0)) + abs(line(t1))) * lever
  np.testing.assert_allclose(vde.extrapolate(t, t0, line(t0), t1, line(t1)), line(t), rtol=1e-9,
                             atol=atol)


@pytest.mark.parametrize("interval,count", [(3, 22), (4, 18), (5, 16)])
def test_full_step_indices_give_the_papers_counts(interval, count):
  steps = vde.full_step_indices(50, 6, interval)
  assert len(steps) == count
  assert steps[:7] == tuple(range(7)) and steps[-1] == 49
  assert all(b - a <= interval for a, b in zip(steps, steps[1:]))


def test_full_step_indices_by_hand():
  assert vde.full_step_indices(12, 2, 4) == (0, 1, 2, 6, 10, 11)
  assert vde.full_step_indices(5, 4, 3) == (0, 1, 2, 3, 4)
  assert vde.full_step_indices(8, 1, 1) == tuple(range(8))


@pytest.mark.parametrize("args,match", [((50, 6, 0), "interval"), ((50, 50, 3), "stable_step"),
                                        ((50, 0, 3), "stable_step"), ((1, 0, 1), "num_steps"),
                                        ((50, 6.0, 3), "stable_step must be an int")])
def test_full_step_indices_rejects_bad_input(args, match):
  with pytest.raises(ValueError, match=match):
    vde.full_step_indices(*args)


def test_reorthogonalize_projects_u_off_the_current_x_and_renormalises(rng):
  x = rng.normal(size=(4, 3, 5))
  u = rng.normal(size=(4, 3, 5))
  u[2] = 0.0                                             # no direction stays none
  got = np.asarray(vde.reorthogonalize(jnp.asarray(u, jnp.float32), jnp.asarray(x, jnp.float32)))
  flat_u, flat_x = u.reshape(4, -1), x.reshape(4, -1)
  r = flat_u - (np.sum(flat_u * flat_x, 1) / np.sum(flat_x ** 2, 1))[:, None] * flat_x
  norm = np.linalg.norm(r, axis=1, keepdims=True)
  expected = np.where(norm > 0, r / np.where(norm > 0, norm, 1), 0).reshape(x.shape)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(got[2], 0.0)
  np.testing.assert_allclose(np.sum(got.reshape(4, -1) * flat_x, 1), 0.0, atol=1e-5)
  with pytest.raises(ValueError, match="share a shape"):
    vde.reorthogonalize(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


def test_relative_error_is_the_ratio_of_norms_over_everything(rng):
  v, v_hat = rng.normal(size=(2, 2, 3, 4))
  expected = np.linalg.norm(v_hat - v) / np.linalg.norm(v)
  np.testing.assert_allclose(vde.relative_error(jnp.asarray(v_hat), jnp.asarray(v)), expected,
                             rtol=1e-5)
  zero = jnp.zeros((2, 3))
  assert float(vde.relative_error(zero, zero)) == 0.0
  assert float(vde.relative_error(zero + 1, zero)) == np.inf
