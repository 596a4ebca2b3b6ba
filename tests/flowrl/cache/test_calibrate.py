"""TeaCache's calibration (flowrl/cache/calibrate.py): per-branch changes along the trajectory, the plain
and the constrained (non-negative, non-decreasing) fits and their R^2."""
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from core import flow
from flowrl.cache import calibrate, sampling

STEPS = 8


def _r2(x, y, coefficients):
  residual = y - np.polyval(coefficients, x)
  return 1 - np.sum(residual ** 2) / np.sum((y - y.mean()) ** 2)


def test_calibration_fit_recovers_a_polynomial(rng):
  coefficients = rng.normal(size=5)
  d_in = rng.uniform(0.01, 0.2, size=(30, 4))
  with warnings.catch_warnings():
    warnings.simplefilter("error")      # a well-spread range: no ill-conditioning warning
    result = calibrate.fit(d_in, np.polyval(coefficients, d_in))
  np.testing.assert_allclose(result["coefficients"], coefficients, rtol=1e-4, atol=1e-6)
  assert result["rmse"] < 1e-8 and result["points"] == 120
  assert result["r2"] > 1 - 1e-12 and result["calibrated"] and not result["constrained"]
  # The condition number is that of the degree-4 Vandermonde matrix (< 1e7 on this range).
  np.testing.assert_allclose(result["condition_number"],
                             np.linalg.cond(np.vander(d_in.ravel(), 5)), rtol=1e-6)


def test_calibration_warns_when_the_fit_is_ill_conditioned(rng):
  """Input changes in a range 1e-4 wide: a degree-4 fit's condition number is ~1e18 and its
  coefficients huge; the warning names the condition number and the range."""
  centre = rng.uniform(0.05, 0.2)
  d_in = centre + rng.uniform(0, 1e-4, size=(16, 4))
  d_out = 0.5 * d_in + 0.01 * rng.normal(size=d_in.shape)
  with pytest.warns(RuntimeWarning, match=r"ill-conditioned: condition number .* over input changes in"):
    result = calibrate.fit(d_in, d_out)
  assert result["condition_number"] > calibrate.ILL_CONDITIONED


def test_bernstein_coefficients_convert_to_the_same_polynomial(rng):
  c = rng.normal(size=5)
  lo = rng.uniform(0, 0.1)
  hi = lo + rng.uniform(0.05, 0.3)
  x = rng.uniform(lo, hi, size=50)
  np.testing.assert_allclose(np.polyval(calibrate.bernstein_to_power(c, lo, hi), x),
                             calibrate.bernstein_basis((x - lo) / (hi - lo), 4) @ c,
                             rtol=1e-9, atol=1e-9 * np.abs(c).max())


def test_monotone_fit_is_exact_for_an_increasing_non_negative_polynomial(rng):
  """Any polynomial with non-negative coefficients in (x - lo) lies in the constrained family."""
  d_in = rng.uniform(0.01, 0.3, size=(40, 3))
  lo = d_in.min()
  shifted = rng.uniform(0, 2, size=5) * (rng.uniform(size=5) < 0.7)   # some coefficients 0
  d_out = np.polyval(shifted, d_in - lo)
  result = calibrate.fit_monotone(d_in, d_out)
  np.testing.assert_allclose(np.polyval(result["coefficients"], d_in), d_out, rtol=1e-7,
                             atol=1e-9 * max(np.abs(d_out).max(), 1.0))
  assert result["constrained"] and result["input_change_range"] == [lo, d_in.max()]


def test_monotone_fit_is_non_negative_increasing_and_optimal_on_noisy_non_monotone_data(rng):
  """Data that dip and fall (where the plain fit goes negative or decreases): the constrained fit is
  non-negative and non-decreasing over the observed range, no feasible Bernstein polynomial fits
  better (against scipy's constrained solver from random feasible starts), and its R^2 is the
  definition's."""
  d_in = rng.uniform(0.02, 0.25, size=200)
  d_out = (0.05 + 0.3 * np.sin(25 * d_in) ** 2 - 0.2 * d_in
           + 0.02 * rng.normal(size=d_in.size))
  result = calibrate.fit_monotone(d_in, d_out)
  grid = np.linspace(d_in.min(), d_in.max(), 2001)
  p = np.polyval(result["coefficients"], grid)
  scale = np.abs(d_out).max()
  assert p.min() >= -1e-9 * scale and np.diff(p).min() >= -1e-9 * scale
  np.testing.assert_allclose(result["r2"], _r2(d_in, d_out, result["coefficients"]), rtol=1e-9)
  assert result["calibrated"] == (result["r2"] >= calibrate.CALIBRATED_R2)
  # Optimality: the same problem (increments >= 0 of the Bernstein coefficients) by another solver.
  lo, hi = d_in.min(), d_in.max()
  design = calibrate.bernstein_basis((d_in - lo) / (hi - lo), 4) @ np.tril(np.ones((5, 5)))
  sse = lambda d: np.sum((design @ d - d_out) ** 2)
  best = min(scipy.optimize.minimize(sse, rng.uniform(0, 1, 5), bounds=[(0, None)] * 5,
                                     method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12}).fun
             for _ in range(3))
  ours = np.sum((np.polyval(result["coefficients"], d_in) - d_out) ** 2)
  assert ours <= best * (1 + 1e-6) + 1e-12


def test_fits_reject_bad_input():
  with pytest.raises(ValueError, match="as many entries"):
    calibrate.fit(np.zeros(5), np.zeros(6))
  with pytest.raises(ValueError, match="more than degree = 4 points; got 4"):
    calibrate.fit_monotone(np.arange(4.0), np.arange(4.0))
  with pytest.raises(ValueError, match="must be finite; got 1 and 0 non-finite"):
    calibrate.fit_monotone(np.array([0.1, 0.2, np.nan, 0.3, 0.4, 0.5]), np.ones(6))
  with pytest.raises(ValueError, match="d_in must span a range"):
    calibrate.fit_monotone(np.full(10, 0.1), np.ones(10))


def test_relative_changes_are_per_branch_along_the_trajectory(rng):
  """With guidance the changes are [steps - 1, 2 B]: each branch's rows on their own."""
  w = rng.normal(size=(2, 5, 5)) / 3
  w32 = jnp.asarray(w, jnp.float32)
  fn = lambda x, t, k: jnp.tanh(jnp.einsum("nd,nde->ne", x, w32[k])) * (1 + t[:, None]) - x
  scale, batch = 2.5, 3
  net = sampling.velocity_network(fn, cond=jnp.zeros(batch, jnp.int32), null_cond=1, cfg_scale=scale)
  x_T = jnp.asarray(rng.normal(size=(batch, 5)), jnp.float32)
  d_in, d_out = calibrate.relative_changes(net, x_T, STEPS)
  assert d_in.shape == d_out.shape == (STEPS - 1, 2 * batch)
  grid = np.asarray(flow.time_grid(STEPS), np.float64)
  xs, vs, x = [], [], np.asarray(x_T, np.float64)
  for i in range(STEPS):
    v = np.stack([np.tanh(x @ w[k]) * (1 + grid[i]) - x for k in range(2)])   # [2, B, 5]
    xs.append(np.concatenate([x, x])), vs.append(v.reshape(2 * batch, 5))
    x = x + (grid[i + 1] - grid[i]) * (scale * v[0] + (1 - scale) * v[1])
  change = lambda a: np.abs(np.diff(a, axis=0)).mean(-1) / np.abs(np.asarray(a)[:-1]).mean(-1)
  np.testing.assert_allclose(d_in, change(np.stack(xs)), rtol=1e-4)
  np.testing.assert_allclose(d_out, change(np.stack(vs)), rtol=1e-4)
