"""flowrl.samplers against closed forms in float64 numpy, marginal preservation, trajectories, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from core import flow
from flowrl import samplers

SDE_METHODS = ("flow_grpo", "dance", "cps", "precise", "dance_precise")


def reference_step(method, x, v, t, s, eta):
  """(mean, std) of design/precise.md written out in float64; t, s broadcast against x."""
  dt = s - t
  x0, eps = x - t * v, x + (1 - t) * v
  if method == "ode":
    return x + v * dt, np.zeros_like(t)
  if method == "flow_grpo":
    sigma = eta * np.sqrt(t / (1 - np.where(t == 1, s, t)))
    mean = x * (1 + sigma ** 2 * dt / (2 * t)) + v * dt * (1 + sigma ** 2 * (1 - t) / (2 * t))
    return mean, sigma * np.sqrt(-dt)
  if method == "dance":
    score = -(x - (1 - t) * x0) / t ** 2
    return x + v * dt - 0.5 * eta ** 2 * score * dt, eta * np.sqrt(t - s)
  if method == "cps":
    return (1 - s) * x0 + s * np.cos(eta * np.pi / 2) * eps, s * np.sin(eta * np.pi / 2)
  if method == "precise":
    r = s * (1 - t) / (t * (1 - s))
    std = np.sqrt(s ** 2 * (1 - r ** (eta ** 2)))
  else:
    with np.errstate(divide="ignore"):
      rho = np.exp(-0.5 * eta ** 2 * (1 / s - 1 / t))
    std = s * np.sqrt(1 - rho ** 2)
  std = np.maximum(std, 1e-6)
  return (1 - s) * x0 + np.sqrt(np.maximum(s ** 2 - std ** 2, 0)) * eps, std


def _f32(a):
  """a rounded to float32 (as float64): the float64 references see exactly what the samplers see."""
  return np.asarray(a, np.float32).astype(np.float64)


def _random_inputs(rng, batch=5, shape=(3, 4)):
  x = rng.standard_normal((batch, *shape))
  v = rng.standard_normal((batch, *shape))
  z = rng.standard_normal((batch, *shape))
  return _f32(x), _f32(v), _f32(z)


@pytest.mark.parametrize("method", samplers.METHODS)
def test_step_matches_the_closed_form_for_per_example_and_scalar_times(rng, method):
  x, v, z = _random_inputs(rng)
  # The reference runs on the float32-rounded times: Flow-GRPO's sigma_t^2 = a^2 t / (1 - t) has
  # condition number 1 / (1 - t) in t, so near t = 1 the float32 rounding of a float64 t alone moved
  # the mean by more than rtol (about 1 draw in 1000). On the same inputs the float32 step is accurate
  # there too (1 - t is exact for t >= 1/2), so t keeps its whole range.
  t_B = _f32(rng.uniform(0.2, 1.0, 5))
  t_B[0] = 1.0                                            # Flow-GRPO's t = 1 rule
  s_B = _f32(t_B * rng.uniform(0.0, 0.95, 5))
  s_B[1] = 0.0                                            # the last step of a grid
  eta = float(_f32(rng.uniform(0.2, 1.6)))
  x_next, mean, std = samplers.sde_step(method, jnp.asarray(x, jnp.float32), jnp.asarray(v, jnp.float32),
                                        jnp.asarray(t_B, jnp.float32), jnp.asarray(s_B, jnp.float32),
                                        jnp.asarray(z, jnp.float32), eta)
  t4, s4 = t_B[:, None, None], s_B[:, None, None]
  want_mean, want_std = reference_step(method, x, v, t4, s4, eta)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.broadcast_to(std, x.shape), np.broadcast_to(want_std, x.shape),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(x_next, mean + std * jnp.asarray(z, jnp.float32), rtol=0, atol=0)
  # A scalar time gives the same step as a constant [B] one.
  t, s = float(t_B[2]), float(s_B[2])
  _, mean_s, std_s = samplers.sde_step(method, jnp.asarray(x[2:3], jnp.float32),
                                       jnp.asarray(v[2:3], jnp.float32), t, s,
                                       jnp.asarray(z[2:3], jnp.float32), eta)
  np.testing.assert_allclose(mean_s[0], mean[2], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.ravel(std_s)[0], np.ravel(np.broadcast_to(std, x.shape)[2])[0],
                             rtol=1e-6)


@pytest.mark.parametrize("method", ["flow_grpo", "dance"])
def test_euler_maruyama_means_are_euler_plus_half_variance_times_score(rng, method):
  x, v, z = _random_inputs(rng)
  t, s, eta = (float(_f32(a)) for a in (rng.uniform(0.3, 0.9), rng.uniform(0.05, 0.25),
                                        rng.uniform(0.2, 1.0)))
  _, mean, std = samplers.sde_step(method, jnp.asarray(x, jnp.float32), jnp.asarray(v, jnp.float32),
                                   t, s, jnp.asarray(z, jnp.float32), eta)
  score = -(x - (1 - t) * (x - t * v)) / t ** 2
  np.testing.assert_allclose(mean, x + v * (s - t) + 0.5 * float(std) ** 2 * score, rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("method", ["cps", "precise", "dance_precise"])
def test_zero_eta_is_the_deterministic_ddim_step(rng, method):
  x, v, z = _random_inputs(rng)
  t, s = float(_f32(rng.uniform(0.3, 1.0))), float(_f32(rng.uniform(0.05, 0.25)))
  x_next, mean, std = samplers.sde_step(method, jnp.asarray(x, jnp.float32), jnp.asarray(v, jnp.float32),
                                        t, s, jnp.asarray(z, jnp.float32), 0.0)
  ddim = (1 - s) * (x - t * v) + s * (x + (1 - t) * v)
  np.testing.assert_allclose(mean, ddim, rtol=1e-5, atol=1e-5)
  assert float(std) <= samplers.MIN_STD
  # x_next - ddim = std z with std <= 1e-6: within atol while |z| < 9 (60 entries: P < 1e-17).
  np.testing.assert_allclose(x_next, ddim, atol=1e-5)


def _propagate(method, m, var, x0_star, t, s, eta):
  """Pushes the 1-D Gaussian N(m, var) through one step with the exact point-mass velocity
  v(x, t) = (x - x0*) / t; the step's mean is affine in x, so the result is Gaussian."""
  xs = jnp.array([[0.0], [1.0]], jnp.float32)
  v = (xs - x0_star) / t
  _, mean, std = samplers.sde_step(method, xs, v, t, s, jnp.zeros_like(xs), eta)
  a, b = float(mean[1, 0] - mean[0, 0]), float(mean[0, 0])
  return a * m + b, a ** 2 * var + float(std) ** 2


@pytest.mark.parametrize("method", ["cps", "precise", "dance_precise"])
def test_exact_samplers_keep_the_marginal_of_a_point_mass_at_every_step(rng, method):
  x0_star, eta = rng.uniform(-2, 2), rng.uniform(0.3, 1.5)
  grid = np.asarray(flow.time_grid(10, shift=rng.uniform(1, 3)))
  m, var = 0.0, 1.0                                       # x_1 ~ N(0, 1)
  for t, s in zip(grid[:-2], grid[1:-1]):
    m, var = _propagate(method, m, var, x0_star, float(t), float(s), eta)
    np.testing.assert_allclose([m, var], [(1 - s) * x0_star, s ** 2], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("method", ["flow_grpo", "dance"])
def test_euler_maruyama_samplers_keep_the_marginal_only_as_dt_goes_to_zero(rng, method):
  # From the exact marginal N((1 - t) x0*, t^2) one step keeps the mean exactly and makes the variance
  # s^2 + c h^2 with c = k / t + k^2 / (4 t^2), k = eta^2 (dance) or eta^2 t / (1 - t) (flow_grpo):
  # c >= 0.31 on these ranges, so errors[0] >= 0.012 and each ratio is 1/4 up to float32 rounding.
  x0_star, eta, t = rng.uniform(-2, 2), rng.uniform(0.5, 1.0), rng.uniform(0.5, 0.8)
  errors = []
  for h in (0.2, 0.1, 0.05, 0.025):
    s = t - h
    m, var = _propagate(method, (1 - t) * x0_star, t ** 2, x0_star, t, s, eta)
    errors.append(abs(m - (1 - s) * x0_star) + abs(var - s ** 2))
  assert errors[0] > 1e-3, errors                         # a visible discretisation error
  assert all(b < 0.6 * a for a, b in zip(errors, errors[1:])), errors


def test_gaussian_log_prob_is_scipys_density_averaged_over_dims(rng):
  x, mean = _f32(rng.standard_normal((4, 3, 5))), _f32(rng.standard_normal((4, 3, 5)))
  for std in (_f32(rng.uniform(0.1, 2.0)), _f32(rng.uniform(0.1, 2.0, (4, 1, 1)))):
    got = samplers.gaussian_log_prob(jnp.asarray(x, jnp.float32), jnp.asarray(mean, jnp.float32),
                                     jnp.asarray(std, jnp.float32))
    want = stats.norm.logpdf(x, mean, std).reshape(4, -1).mean(1)
    assert got.shape == (4,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _velocity(key, dim=3):
  """A random nonlinear velocity field (x [B, dim], t [B]) -> [B, dim]."""
  w1, w2 = jax.random.normal(key, (2, dim, dim))
  return lambda x, t: jnp.tanh(x @ w1) @ w2 + t[:, None] * x


def test_all_ode_sampling_is_core_euler_sampling(key):
  fn = _velocity(key)
  x_T = jax.random.normal(jax.random.fold_in(key, 1), (6, 3))
  grid = flow.time_grid(7, shift=2.0)
  want, want_traj = flow.euler_sample(fn, x_T, grid, return_trajectory=True)
  for method, window in (("ode", None), ("precise", np.zeros(7, bool))):
    traj = samplers.sample(fn, x_T, grid, key, method=method, eta=1.0, sde_window=window)
    # The same Euler updates in another compiled program: equal up to float32 rounding (1 ulp was
    # seen with XLA's LLVM optimisation off); an SDE step would differ by its noise, ~1e-1.
    np.testing.assert_allclose(traj.x0, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(traj.xs, want_traj, rtol=1e-6, atol=1e-6)
    assert not np.any(traj.sde_mask) and np.all(traj.log_probs == 0) and np.all(traj.stds == 0)


@pytest.mark.parametrize("method", SDE_METHODS)
def test_sde_window_is_stochastic_inside_and_euler_outside(rng, key, method):
  fn = _velocity(key)
  x_T = jax.random.normal(jax.random.fold_in(key, 1), (6, 3))
  grid = flow.time_grid(8, shift=3.0)
  start = int(rng.integers(0, 5))
  traj = samplers.sample(fn, x_T, grid, key, method=method, eta=0.7, sde_window=(start, start + 3))
  mask = np.zeros(8, bool)
  mask[start:start + 3] = True
  np.testing.assert_array_equal(traj.sde_mask, mask)
  as_mask = samplers.sample(fn, x_T, grid, key, method=method, eta=0.7, sde_window=jnp.asarray(mask))
  np.testing.assert_array_equal(as_mask.xs, traj.xs)
  assert traj.xs.shape == (9, 6, 3) and traj.means.shape == (8, 6, 3)
  assert traj.stds.shape == traj.log_probs.shape == (8, 6)
  for k in range(8):
    t, s = float(grid[k]), float(grid[k + 1])
    v = fn(traj.xs[k], jnp.full((6,), t))
    if mask[k]:
      _, mean, std = samplers.sde_step(method, traj.xs[k], v, t, s, jnp.zeros((6, 3)), 0.7)
      np.testing.assert_allclose(traj.means[k], mean, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(traj.stds[k], np.full(6, float(std)), rtol=1e-6)
      assert float(std) > 0 and not np.allclose(traj.xs[k + 1], mean)
      np.testing.assert_allclose(traj.log_probs[k],
                                 samplers.gaussian_log_prob(traj.xs[k + 1], mean, std), rtol=1e-5,
                                 atol=1e-5)
    else:
      np.testing.assert_allclose(traj.xs[k + 1], traj.xs[k] + (s - t) * v, rtol=1e-6, atol=1e-6)
      assert np.all(traj.stds[k] == 0) and np.all(traj.log_probs[k] == 0)
  np.testing.assert_array_equal(traj.x0, traj.xs[-1])
  # One key gives one trajectory; another key another.
  again = samplers.sample(fn, x_T, grid, key, method=method, eta=0.7, sde_window=(start, start + 3))
  np.testing.assert_array_equal(again.xs, traj.xs)
  other = samplers.sample(fn, x_T, grid, jax.random.fold_in(key, 7), method=method, eta=0.7,
                          sde_window=(start, start + 3))
  assert not np.allclose(other.x0, traj.x0)


def test_default_window_is_every_step_but_the_last_and_a_traced_window_works_under_jit(key):
  fn = _velocity(key)
  x_T = jax.random.normal(key, (4, 3))
  grid = flow.time_grid(6)
  traj = samplers.sample(fn, x_T, grid, key, method="precise", eta=1.5)
  np.testing.assert_array_equal(traj.sde_mask, [True] * 5 + [False])
  run = jax.jit(lambda start: samplers.sample(fn, x_T, grid, key, method="cps", eta=0.8,
                                              sde_window=(start, start + 2)))
  for start in (0, 3):
    np.testing.assert_array_equal(run(start).sde_mask, np.isin(np.arange(6), [start, start + 1]))


def test_bad_input_raises_clear_errors():
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="s < t"):
    samplers.sde_step("precise", x, x, 0.5, 0.5, x, 1.0)
  with pytest.raises(ValueError, match="s < t"):
    samplers.sde_step("cps", x, x, jnp.array([0.5, 0.4]), jnp.array([0.3, 0.45]), x, 1.0)
  with pytest.raises(ValueError, match="method must be one of"):
    samplers.sde_step("ddpm", x, x, 0.5, 0.3, x, 1.0)
  with pytest.raises(ValueError, match="eta"):
    samplers.sde_step("dance", x, x, 0.5, 0.3, x, -0.1)
  with pytest.raises(ValueError, match="must share a shape"):
    samplers.sde_step("dance", x, x, 0.5, 0.3, jnp.ones((2, 4)), 0.3)
  with pytest.raises(ValueError, match="t must be a scalar or have shape"):
    samplers.sde_step("dance", x, x, jnp.full((3,), 0.5), 0.3, x, 0.3)
  fn = lambda x, t: x
  with pytest.raises(ValueError, match="deterministic"):
    samplers.sample(fn, x, flow.time_grid(4), jax.random.PRNGKey(0), method="cps", eta=0.8,
                    sde_window=(0, 4))
  with pytest.raises(ValueError, match="sde_window must be"):
    samplers.sample(fn, x, flow.time_grid(4), jax.random.PRNGKey(0), method="cps", eta=0.8,
                    sde_window=np.ones(3, bool))
  with pytest.raises(ValueError, match="needs null_cond"):
    samplers.guided_velocity(lambda x, t, y: x, jnp.zeros(2, jnp.int32), None, 2.0)
  # Traced values are not checked (no error under jit, where they are unknown).
  jax.jit(lambda s: samplers.sde_step("precise", x, x, 0.5, s, x, 1.0))(0.2)


@pytest.mark.parametrize("method", samplers.METHODS)
def test_mean_velocity_gain_is_the_slope_of_the_reference_mean(rng, method):
  # The mean is affine in v with one scalar slope: the float64 reference's mean(v = 1) - mean(v = 0).
  t = float(_f32(rng.choice([1.0, rng.uniform(0.2, 0.95)])))
  s = float(_f32(rng.uniform(0.0, 0.9) * t))
  eta = float(_f32(rng.uniform(0.2, 1.6)))
  x = np.zeros((2, 3))
  slope = (reference_step(method, x, np.ones_like(x), t, s, eta)[0]
           - reference_step(method, x, np.zeros_like(x), t, s, eta)[0])
  got = samplers.mean_velocity_gain(method, t, s, eta, jnp.zeros((2, 3), jnp.float32))
  np.testing.assert_allclose(got, np.abs(slope), rtol=2e-5, atol=1e-6)
  if method == "ode":
    np.testing.assert_allclose(got, t - s, rtol=1e-6)


@pytest.mark.parametrize("method", ["flow_grpo", "dance"])
def test_sde_last_step_ends_noisy_and_is_not_trainable(key, method):
  fn = _velocity(key)
  x_T = jax.random.normal(key, (64, 3))
  grid = flow.time_grid(5)
  eta = {"flow_grpo": 0.7, "dance": 0.3}[method]
  traj = samplers.sample(fn, x_T, grid, key, method=method, eta=eta, sde_last_step=True)
  np.testing.assert_array_equal(traj.sde_mask, [True] * 5)
  np.testing.assert_array_equal(samplers.trainable_steps(traj.sde_mask), [True] * 4 + [False])
  t = float(grid[-2])
  want = eta * np.sqrt(t / (1 - t)) * np.sqrt(t) if method == "flow_grpo" else eta * np.sqrt(t)
  np.testing.assert_allclose(traj.stds[-1], want, rtol=1e-5)
  # The last transition is mean + std * z with its own noise: the residual is std * N(0, 1).
  z = (traj.x0 - traj.means[-1]) / want
  assert 0.5 < float(jnp.std(z)) < 1.5
  plain = samplers.sample(fn, x_T, grid, key, method=method, eta=eta)
  np.testing.assert_allclose(plain.xs[:-1], traj.xs[:-1], rtol=1e-6, atol=1e-6)  # same until then
  x = traj.xs[-2]
  _, mean, _ = samplers.sde_step(method, x, fn(x, jnp.full((64,), t)), t, 0.0, jnp.zeros_like(x), eta)
  np.testing.assert_allclose(traj.means[-1], mean, rtol=1e-5, atol=1e-6)     # the SDE's own mean
  for deterministic in ("cps", "precise"):
    with pytest.raises(ValueError, match="sde_last_step"):
      samplers.sample(fn, x_T, grid, key, method=deterministic, eta=0.8, sde_last_step=True)
