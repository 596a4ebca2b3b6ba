"""Tests for core/flow.py: identities, closed forms and invariants of the rectified-flow math."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import flow


def _normal(rng, shape):
  # numpy draws: eager jax.random costs a compilation per shape, which dominates these tests' time.
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _uniform(rng, shape, low=0.0, high=1.0):
  return jnp.asarray(rng.uniform(low, high, shape), jnp.float32)


_EPS32 = float(np.finfo(np.float32).eps)


def test_interpolate_endpoints_and_velocity_is_time_derivative(rng):
  x0, eps = _normal(rng, (4, 5, 3)), _normal(rng, (4, 5, 3))
  np.testing.assert_allclose(flow.interpolate(x0, eps, 0.0), x0)
  np.testing.assert_allclose(flow.interpolate(x0, eps, jnp.ones(4)), eps)
  t = _uniform(rng, (4,))
  _, dx_dt = jax.jvp(lambda t: flow.interpolate(x0, eps, t), (t,), (jnp.ones(4),))
  np.testing.assert_allclose(dx_dt, flow.velocity_target(x0, eps), atol=1e-6)


def test_x0_and_eps_from_velocity_invert_interpolate(rng):
  # The round trip is off by <= 3.5 eps32 max(|x0|, |eps|) (a few float32 roundings): within atol
  # unless a normal draw lies beyond 10 sigma.
  x0, eps = _normal(rng, (6, 4, 4, 2)), 2.0 * _normal(rng, (6, 4, 4, 2))
  t = _uniform(rng, (6,))
  x_t = flow.interpolate(x0, eps, t)
  v = flow.velocity_target(x0, eps)
  np.testing.assert_allclose(flow.x0_from_velocity(x_t, v, t), x0, atol=1e-5)
  np.testing.assert_allclose(flow.eps_from_velocity(x_t, v, t), eps, atol=1e-5)
  # Per-example times must really be per example: example 0 at t[0] agrees with a scalar call.
  np.testing.assert_allclose(flow.interpolate(x0, eps, t)[0], flow.interpolate(x0, eps, t[0])[0],
                             atol=1e-6)


def test_time_of_wrong_shape_is_rejected():
  x = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match="shape"):
    flow.interpolate(x, x, jnp.zeros(3))
  with pytest.raises(ValueError, match="shape"):
    flow.x0_from_velocity(x, x, jnp.zeros((4, 1)))


def test_time_shift_formula_identity_monotone_and_inverse(rng):
  # One time in each of 257 equal bins, kept 0.1 bin away from the bin edges: increasing by
  # construction, gaps >= 0.2 / 257 and 1 - t >= 0.1 / 257, so float32 rounding (~6e-8) can neither
  # tie neighbours (the shift's slope is >= 1/6 here) nor push a time onto 0 or 1 or onto its own
  # shift.
  t = (np.arange(257) + rng.uniform(0.1, 0.9, 257)) / 257
  for shift in (0.5, 1.0, 3.0, 6.0):
    got = np.asarray(flow.time_shift(jnp.asarray(t, jnp.float32), shift))
    np.testing.assert_allclose(got, [shift * u / (1 + (shift - 1) * u) for u in t], rtol=1e-6)
    assert np.all(np.diff(got) > 0)
    assert np.all((got > 0) & (got < 1))
    assert flow.time_shift(0.0, shift) == 0.0 and flow.time_shift(1.0, shift) == 1.0
    np.testing.assert_allclose(flow.time_shift(got, 1 / shift), t, rtol=1e-5, atol=1e-6)
    if shift > 1:  # a shift above 1 moves every interior time toward noise
      assert np.all(got > t)
  np.testing.assert_array_equal(flow.time_shift(t, 1.0), t)


def test_resolution_shift():
  # PiD: s = 6 sqrt(sqrt(H W) / 2048), which is 6 at 2048 x 2048 and 3 at 512 x 512.
  pid_shift = lambda h, w: flow.resolution_shift(math.sqrt(h * w), base=2048, base_shift=6.0)
  assert pid_shift(2048, 2048) == pytest.approx(6.0)
  assert pid_shift(512, 512) == pytest.approx(3.0)
  # SD3: sqrt(m / n) with pixel counts; doubling the side doubles the shift.
  assert flow.resolution_shift(1024 ** 2, base=512 ** 2) == pytest.approx(2.0)
  n = jnp.array([256.0, 4096.0])
  np.testing.assert_allclose(flow.resolution_shift(n, base=1024, base_shift=3.0),
                             3.0 * np.sqrt(np.asarray(n) / 1024), rtol=1e-6)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 0.7)])
def test_logit_normal_sample_statistics(mean, std, key):
  n = 200_000
  t = flow.sample_time(key, n, kind="logit_normal", mean=mean, std=std)
  assert t.shape == (n,) and t.dtype == jnp.float32
  logit = np.log(np.asarray(t, np.float64)) - np.log1p(-np.asarray(t, np.float64))
  # 6 standard errors (std / sqrt(n) for the mean, std / sqrt(2 n) for the std): each check fails by
  # chance on 2e-9 of the draws.
  assert abs(logit.mean() - mean) < 6 * std / np.sqrt(n)
  assert abs(logit.std() - std) < 6 * std / np.sqrt(2 * n)
  # A shifted draw is the shift of the unshifted one, so undoing the shift recovers N(mean, std^2).
  shifted = flow.sample_time(key, n, kind="logit_normal", mean=mean, std=std, shift=3.0)
  np.testing.assert_allclose(flow.time_shift(shifted, 1 / 3.0), t, atol=1e-5)


def test_uniform_samples_lie_in_the_open_interval(key):
  t = np.asarray(flow.sample_time(key, 100_000, kind="uniform", shift=4.0))
  assert np.all((t > 0) & (t < 1))
  # Under shift s, P(t <= 1/2) = P(u <= 1 / (1 + s)) = 0.2 for s = 4. The s.e. of the fraction is
  # sqrt(0.16 / 1e5) = 0.00126, so 0.01 is 7.9 of them (a false alarm on 3e-15 of the draws).
  assert abs(np.mean(t <= 0.5) - 0.2) < 0.01


def test_unknown_time_kind_lists_the_choices():
  with pytest.raises(ValueError, match="uniform.*logit_normal"):
    flow.sample_time(jax.random.key(0), 4, kind="beta")  # rejected before any draw


@pytest.mark.parametrize("shift,t_max,t_min",
                         [(1.0, 1.0, 0.0), (3.0, 1.0, 0.0), (3.0, 0.999, 0.02)])
def test_time_grid_endpoints_and_monotone(shift, t_max, t_min):
  grid = flow.time_grid(10, shift=shift, t_max=t_max, t_min=t_min)
  assert grid.shape == (11,) and grid.dtype == jnp.float32
  assert float(grid[0]) == np.float32(t_max) and float(grid[-1]) == np.float32(t_min)
  assert np.all(np.diff(np.asarray(grid)) < 0)
  # Undoing the shift gives a uniform grid.
  u = np.asarray(flow.time_shift(np.asarray(grid, np.float64), 1 / shift))
  np.testing.assert_allclose(np.diff(u), np.full(10, np.diff(u).mean()), rtol=1e-4)


def test_time_grid_matches_the_shifted_linspace():
  np.testing.assert_allclose(flow.time_grid(8, shift=3.0),
                             flow.time_shift(np.linspace(1.0, 0.0, 9), 3.0), rtol=1e-6)
  with pytest.raises(ValueError, match="num_steps"):
    flow.time_grid(0)
  with pytest.raises(ValueError, match="t_min"):
    flow.time_grid(4, t_max=0.2, t_min=0.5)


def test_flow_matching_loss_against_numpy(rng):
  v, x0, eps = _normal(rng, (5, 3, 2)), _normal(rng, (5, 3, 2)), _normal(rng, (5, 3, 2))
  mse = ((np.asarray(v) - (np.asarray(eps) - np.asarray(x0))) ** 2).reshape(5, -1).mean(1)
  np.testing.assert_allclose(flow.flow_matching_loss(v, x0, eps), mse.mean(), rtol=1e-6)
  w = _uniform(rng, (5,))
  np.testing.assert_allclose(flow.flow_matching_loss(v, x0, eps, weight=w),
                             (np.asarray(w) * mse).mean(), rtol=1e-6)
  assert float(flow.flow_matching_loss(eps - x0, x0, eps)) == 0.0
  with pytest.raises(ValueError, match="weight"):
    flow.flow_matching_loss(v, x0, eps, weight=jnp.ones(4))


def test_flow_matching_batch_is_consistent(rng, key):
  x0 = _normal(rng, (8, 4, 4, 3))
  x_t, t, target, eps = jax.jit(
      lambda k, x: flow.flow_matching_batch(k, x, time_kind="logit_normal", shift=2.0))(key, x0)
  assert x_t.shape == x0.shape and t.shape == (8,) and target.shape == x0.shape
  assert np.all((np.asarray(t) > 0) & (np.asarray(t) < 1))
  # Compiled and eager float32 may round differently (they differ by 1 ulp on some draws): by at
  # most eps32 (|x0| + |eps|) for these two- and three-term sums.
  atol = 2 * _EPS32 * float(jnp.max(jnp.abs(x0) + jnp.abs(eps)))
  np.testing.assert_allclose(x_t, flow.interpolate(x0, eps, t), atol=atol)
  np.testing.assert_allclose(target, eps - x0, atol=atol)
  assert 0.5 < float(jnp.std(eps)) < 1.5  # 384 draws: the sample std's s.e. is 0.036


def _gaussian_problem(rng, batch=64, dim=6):
  """x0 ~ N(mu, diag(s0^2)): the exact velocity field and the exact ODE flow from t = 1.

  With a = 1 - t, b = t: x_t ~ N(a mu, a^2 s0^2 + b^2), E[x0 | x] = mu + a s0^2 (x - a mu) / Var and
  E[eps | x] = b (x - a mu) / Var, so v = E[eps - x0 | x] = (b - a s0^2) (x - a mu) / Var - mu.
  The ODE keeps z = (x_t - a mu) / sqrt(Var_t) constant, so x_t = a mu + sqrt(Var_t) x1 and
  x_0 = mu + s0 x1.

  Euler is exact on the mean part a mu (linear in t), so its error is e_n(s0) x1, e_n a function of
  s0 alone: for s0 in [0.3, 2], |e_n| <= 2.95 / n on the uniform grid, e_n / e_2n is in [1.94, 2]
  (and so is the ratio of the max errors), and |e| <= 0.0051 along the 512-step shift-2 grid. x1 is
  clipped to [-3, 3] so that the bounds the Euler tests assert hold for every draw.
  """
  mu = _normal(rng, (dim,))
  s0 = _uniform(rng, (dim,), 0.3, 2.0)
  x1 = jnp.clip(_normal(rng, (batch, dim)), -3.0, 3.0)

  def velocity(x, t_B):
    a, b = 1 - t_B[:, None], t_B[:, None]
    var = a ** 2 * s0 ** 2 + b ** 2
    return (b - a * s0 ** 2) * (x - a * mu) / var - mu

  def exact(t):
    a = 1 - t
    return a * mu + jnp.sqrt(a ** 2 * s0 ** 2 + t ** 2) * x1

  return velocity, x1, exact


def test_euler_converges_to_the_exact_gaussian_flow_at_first_order(rng):
  velocity, x1, exact = _gaussian_problem(rng)
  sample = jax.jit(lambda x, g: flow.euler_sample(velocity, x, g))
  errors = [float(jnp.abs(sample(x1, flow.time_grid(n)) - exact(0.0)).max())
            for n in (16, 32, 64, 128)]
  ratios = np.array(errors[:-1]) / np.array(errors[1:])
  assert np.all((ratios > 1.7) & (ratios < 2.3)), (errors, ratios)
  assert errors[-1] < 0.1  # <= 3 * 2.95 / 128 = 0.069


def test_euler_trajectory_follows_the_exact_flow(rng):
  velocity, x1, exact = _gaussian_problem(rng)
  grid = flow.time_grid(512, shift=2.0)
  x, traj = flow.euler_sample(velocity, x1, grid, return_trajectory=True)
  assert traj.shape == (513,) + x1.shape
  np.testing.assert_array_equal(traj[0], x1)
  np.testing.assert_array_equal(traj[-1], x)
  for i in (128, 256, 384, 512):
    np.testing.assert_allclose(traj[i], exact(grid[i]), atol=2e-2)  # error <= 3 * 0.0051


def _conditional_model(rng):
  """A toy conditional velocity whose calls are counted, and its two inputs' embeddings."""
  table = _normal(rng, (11, 4))
  calls = []

  def velocity(x, t, labels):
    calls.append(x.shape[0])
    return x * t[:, None] + table[labels] + jnp.sin(x) * table[labels, :1]

  return velocity, calls


def test_cfg_velocity_scales_and_uses_one_batched_call(rng):
  velocity, calls = _conditional_model(rng)
  x = _normal(rng, (5, 4))
  t = _uniform(rng, (5,))
  labels = jnp.array([0, 3, 7, 2, 9])
  null = 10
  v_c = velocity(x, t, labels)
  v_u = velocity(x, t, jnp.full((5,), null))
  calls.clear()
  np.testing.assert_array_equal(flow.cfg_velocity(velocity, x, t, labels, null, 1.0), v_c)
  assert calls == [10]
  np.testing.assert_array_equal(flow.cfg_velocity(velocity, x, t, labels, null, 0.0), v_u)
  # 4.5 v_c - 3.5 v_u against v_u + 4.5 (v_c - v_u): float32 roundings of terms of size
  # <= 9 max|v|, at most 21 eps max|v| apart.
  atol = 21 * _EPS32 * float(jnp.maximum(jnp.abs(v_c), jnp.abs(v_u)).max())
  np.testing.assert_allclose(flow.cfg_velocity(velocity, x, t, labels, null, 4.5),
                             v_u + 4.5 * (v_c - v_u), atol=atol)
  assert calls == [10, 10, 10]


def test_guided_closure_runs_in_euler_with_pytree_conditions(rng):
  emb_null = _normal(rng, (1, 4))

  def velocity(x, t, cond):
    return -x * t[:, None] + cond["emb"] * cond["gain"][:, None]

  cond = {"emb": _normal(rng, (3, 4)), "gain": jnp.array([1.0, 2.0, 3.0])}
  null = {"emb": emb_null, "gain": 1.0}
  x_T = _normal(rng, (3, 4))
  grid = flow.time_grid(6)
  out = jax.jit(lambda x: flow.euler_sample(flow.guided(velocity, cond, null, 2.0), x, grid))(x_T)
  expected, size = x_T, float(jnp.abs(x_T).max())
  for t, s in zip(grid[:-1], grid[1:]):
    t_B = jnp.full((3,), t)
    v_c = velocity(expected, t_B, cond)
    v_u = velocity(expected, t_B, {"emb": jnp.broadcast_to(emb_null, (3, 4)), "gain": jnp.ones(3)})
    expected = expected + (s - t) * (v_u + 2.0 * (v_c - v_u))
    size = max(size, float(jnp.abs(expected).max()), float(jnp.abs(v_c).max()),
               float(jnp.abs(v_u).max()))
  # 2 v_c - v_u against v_u + 2 (v_c - v_u), and the updates' own roundings: <= 12 eps32 size over
  # the 6 steps, amplified <= 1.8x by the flow (dv/dx = -t); measured <= 1.8 eps32 size.
  np.testing.assert_allclose(out, expected, atol=24 * _EPS32 * size)


def test_drop_labels_rate_and_values(rng, key):
  labels = jnp.asarray(rng.integers(0, 1000, 100_000), jnp.int32)
  key_drop, key_none, key_all = jax.random.split(key, 3)
  dropped = flow.drop_labels(key_drop, labels, 0.1, 1000)
  assert dropped.dtype == labels.dtype and dropped.shape == labels.shape
  is_null = np.asarray(dropped == 1000)
  # The s.e. of the rate is sqrt(0.09 / 1e5) = 0.00095: 0.005 is 5.3 of them (1.4e-7 of the draws).
  assert abs(is_null.mean() - 0.1) < 0.005
  np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(labels)[~is_null])
  np.testing.assert_array_equal(flow.drop_labels(key_none, labels, 0.0, 1000), labels)
  assert bool(jnp.all(flow.drop_labels(key_all, labels, 1.0, 1000) == 1000))


def test_image_crops_cond_labels_are_the_source_photo_and_held_out_photos_are_null():
  from core import data, flow_task
  from core.data import image_crops
  from experiments.configs import flow_images
  config = flow_images.get_config("smoke,image_crops_cond")
  assert config.model.num_classes == len(image_crops.TRAIN_PHOTOS)
  assert config.flow.shift == config.flow.sample_shift == 3.0
  rng = np.random.default_rng(0)
  for split, photos in (("train", image_crops.TRAIN_PHOTOS), ("eval", image_crops.EVAL_PHOTOS)):
    source = data.load_in_memory("image_crops", split, config="s32")
    idx = np.linspace(0, len(source) - 1, 8).astype(int)
    ys = [int(flow_task.to_model_input(source[int(i)], rng, config)["y"]) for i in idx]
    names = [image_crops.PHOTOS[int(source[int(i)]["source"])] for i in idx]
    if split == "train":     # the photo's index among the training photos
      assert ys == [image_crops.TRAIN_PHOTOS.index(n) for n in names]
    else:                    # a held-out photo: the null label num_classes
      assert set(names) <= set(photos) and ys == [config.model.num_classes] * len(ys)
  # Without the flag labels are kept as they are (digits: 0-9 for 10 classes).
  config.data.unseen_labels_null = False
  eval_example = data.load_in_memory("image_crops", "eval", config="s32")[0]
  assert int(flow_task.to_model_input(eval_example, rng, config)["y"]) == int(eval_example["source"])
