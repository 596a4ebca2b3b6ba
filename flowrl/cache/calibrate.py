"""Fits TeaCache's rescaling polynomial to a trained DiT (arXiv 2411.19108, Sec. 3.4), as TeaCache does
per model:

  python -m flowrl.cache.calibrate --workdir runs/tables/digits_cpu [--num-samples 64] [--out PATH]

Along full Euler trajectories (the run's sample_steps, shift and CFG scale) it records, between
consecutive steps and per sample and branch, the relative L1 change of the first block's modulated
input (TeaCache's signal) and of the model output (the branch's velocity), and fits the output change
as a polynomial of the input change (degree 4, as TeaCache). By default the fit is constrained to be
non-negative and non-decreasing over the observed input changes (`fit_monotone`); `fit` is TeaCache's
plain least squares. Both report R^2; a fit with R^2 < CALIBRATED_R2 explains too little of the output
change to stand for TeaCache. Writes `teacache_coefficients.json` (highest degree first, for
`sampling.teacache`) into the workdir unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from core import flow, flow_task, train
from flowrl.cache import sampling

DEGREE = 4
FILENAME = "teacache_coefficients.json"
# Above this condition number of the fit's Vandermonde matrix, the coefficients are dominated by
# rounding (each is then huge and they cancel): the polynomial is usable only on the fitted range.
ILL_CONDITIONED = 1e10
# Below this R^2 a fit is "uncalibrated": it explains less than half of the output change's variance.
CALIBRATED_R2 = 0.5


def relative_changes(net: sampling.Network, x_T: jax.Array, num_steps: int, *,
                     shift: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """(input change, output change), each [num_steps - 1, K * B] (rows branch-major, as the network's),
  along the full Euler trajectory from x_T.

  change = mean|a_i - a_{i-1}| / mean|a_{i-1}| over one sample's entries in one branch, for a the
  signal [K * B, ...] (input) and the velocity [K, B, ...] (output) at steps i = 1 .. num_steps - 1:
  what TeaCache's per-branch accumulators see.
  """
  batch = x_T.shape[0]

  def by_sample(m, v_K):
    """The signal [K * B, ...] and the velocity [K, B, ...] as [K * B, everything]."""
    return m.reshape(m.shape[0], -1), v_K.reshape(m.shape[0], -1)

  change = lambda a, prev: jnp.abs(a - prev).mean(1) / jnp.abs(prev).mean(1)

  def evaluate(x, t):
    h, c = net.embed(x, jnp.full((batch,), t))
    v_K = net.head(net.blocks(h, c), c)
    return by_sample(net.signal(h, c).astype(jnp.float32), v_K.astype(jnp.float32)), v_K

  def step(carry, ts):
    x, (m_prev, v_prev) = carry
    t, s = ts
    (m, v), v_K = evaluate(x, t)
    return (sampling.euler_step(net, x, t, s, v_K), (m, v)), (change(m, m_prev), change(v, v_prev))

  grid = flow.time_grid(num_steps, shift=shift)
  first, v_K = evaluate(x_T, grid[0])
  x1 = sampling.euler_step(net, x_T, grid[0], grid[1], v_K)
  _, (d_in, d_out) = jax.lax.scan(step, (x1, first), (grid[1:-1], grid[2:]))
  return d_in, d_out


def _points(d_in, d_out, degree) -> tuple[np.ndarray, np.ndarray]:
  """d_in, d_out as float64 vectors, checked: same size, finite, more points than coefficients."""
  x, y = np.asarray(d_in, np.float64).ravel(), np.asarray(d_out, np.float64).ravel()
  if x.shape != y.shape:
    raise ValueError(f"d_in and d_out must have as many entries; got {np.shape(d_in)} and "
                     f"{np.shape(d_out)}")
  if not (isinstance(degree, (int, np.integer)) and degree >= 0):
    raise ValueError(f"degree must be an int >= 0; got {degree!r}")
  if x.size <= degree:
    raise ValueError(f"d_in and d_out need more than degree = {degree} points; got {x.size}")
  if not (np.isfinite(x).all() and np.isfinite(y).all()):
    raise ValueError(f"d_in and d_out must be finite; got {np.sum(~np.isfinite(x))} and "
                     f"{np.sum(~np.isfinite(y))} non-finite values")
  return x, y


def _quality(x: np.ndarray, y: np.ndarray, coefficients: np.ndarray) -> dict:
  """rmse and R^2 = 1 - SS_res / SS_tot of the polynomial on the points, and the points' summary."""
  residual = y - np.polyval(coefficients, x)
  total = np.sum((y - y.mean()) ** 2)
  r2 = 1.0 - np.sum(residual ** 2) / total if total > 0 else float(np.all(residual == 0))
  return {"coefficients": coefficients.tolist(), "points": int(x.size),
          "rmse": float(np.sqrt(np.mean(residual ** 2))), "r2": float(r2),
          "calibrated": bool(r2 >= CALIBRATED_R2), "output_change_mean": float(y.mean()),
          "input_change_range": [float(x.min()), float(x.max())]}


def fit(d_in: np.ndarray, d_out: np.ndarray, degree: int = DEGREE) -> dict:
  """The least-squares polynomial d_out ~ poly(d_in) (TeaCache's fit: unconstrained), its rmse, R^2
  and the condition number of its Vandermonde matrix; warns (RuntimeWarning) when that exceeds
  ILL_CONDITIONED. d_in, d_out: arrays of the same size (flattened)."""
  x, y = _points(d_in, d_out, degree)
  with warnings.catch_warnings():     # polyfit's own RankWarning: the message below says more
    warnings.simplefilter("ignore", np.exceptions.RankWarning)
    coefficients = np.polyfit(x, y, degree)
  condition = float(np.linalg.cond(np.vander(x, degree + 1)))
  if not condition < ILL_CONDITIONED:
    warnings.warn(
        f"TeaCache fit is ill-conditioned: condition number {condition:.3g} of the degree-{degree} "
        f"fit over input changes in [{x.min():.4g}, {x.max():.4g}] (largest |coefficient| "
        f"{np.abs(coefficients).max():.3g}); the polynomial is meaningful only on that range. A "
        "lower degree, or samples spanning more of the trajectory, gives a stable fit.",
        RuntimeWarning, stacklevel=2)
  return {**_quality(x, y, coefficients), "degree": degree, "constrained": False,
          "condition_number": condition}


def bernstein_basis(s: np.ndarray, degree: int) -> np.ndarray:
  """B_j(s) = C(n, j) s^j (1 - s)^(n - j) for s [P] and j = 0 .. n = degree: [P, n + 1]."""
  j = np.arange(degree + 1)
  binomial = np.array([math.comb(degree, k) for k in j], np.float64)
  return binomial * s[:, None] ** j * (1 - s[:, None]) ** (degree - j)


def bernstein_to_power(c: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """The power-basis coefficients (highest degree first, as np.polyval) of sum_j c_j B_j(s) with
  s = (x - lo) / (hi - lo): c [n + 1] -> [n + 1]."""
  n = len(c) - 1
  s = np.polynomial.Polynomial([-lo / (hi - lo), 1.0 / (hi - lo)])
  p = sum(c[j] * math.comb(n, j) * s ** j * (1 - s) ** (n - j) for j in range(n + 1))
  return np.pad(p.coef, (0, n + 1 - len(p.coef)))[::-1]


def fit_monotone(d_in: np.ndarray, d_out: np.ndarray, degree: int = DEGREE) -> dict:
  """The least-squares polynomial d_out ~ poly(d_in) of the given degree that is non-negative and
  non-decreasing over the observed range [min d_in, max d_in], its rmse and R^2.

  TeaCache's plain fit (`fit`) may dip below zero or fall where the output change should grow with
  the input change; here the polynomial is written in the Bernstein basis of that range,
  p = sum_j c_j B_j((x - lo) / (hi - lo)), with c_0 >= 0 and c_0 <= c_1 <= ... <= c_n, which makes it
  non-negative (p >= c_0) and non-decreasing (p' is a non-negative combination of the c_{j+1} - c_j)
  there: a non-negative least squares (scipy.optimize.nnls) in the increments of c. It is
  sufficient, not necessary, for both properties, and exact for any polynomial with non-negative
  coefficients in (x - lo). Returns `fit`'s keys (no condition number; the Bernstein basis is
  well-conditioned) plus "bernstein" (c) and "constrained": True.
  """
  x, y = _points(d_in, d_out, degree)
  lo, hi = float(x.min()), float(x.max())
  if not hi > lo:
    raise ValueError(f"d_in must span a range to fit a polynomial over; all {x.size} values are {lo}")
  cumulative = np.tril(np.ones((degree + 1, degree + 1)))     # c = cumulative @ increments
  design = bernstein_basis((x - lo) / (hi - lo), degree) @ cumulative
  increments, _ = scipy.optimize.nnls(design, y)
  c = cumulative @ increments
  return {**_quality(x, y, bernstein_to_power(c, lo, hi)), "degree": degree, "constrained": True,
          "bernstein": c.tolist()}


def calibrate(model, params, x_T: jax.Array, *, y: jax.Array | None = None, num_steps: int = 50,
              cfg_scale: float = 1.0, shift: float = 1.0, degree: int = DEGREE,
              constrained: bool = True) -> dict:
  """TeaCache's polynomial for a `core.nn.DiT`, from full trajectories of x_T [B, H, W, C] (labels y):
  `fit_monotone` (constrained) or `fit` of every branch's changes (`relative_changes`)."""
  def changes(x, labels):
    net = sampling.dit_network(model, params, x.shape[1:], y=labels, cfg_scale=cfg_scale)
    return relative_changes(net, x, num_steps, shift=shift)

  d_in, d_out = jax.jit(changes)(x_T, y)
  fitted = (fit_monotone if constrained else fit)(np.asarray(d_in), np.asarray(d_out), degree)
  return {**fitted, "num_samples": int(x_T.shape[0]), "num_steps": num_steps,
          "cfg_scale": cfg_scale, "shift": shift}


def calibrate_run(workdir: str, num_samples: int = 64, seed: int = 0) -> dict:
  """calibrate() for the trained flow_images run in workdir, at its sampling settings (EMA params)."""
  params, config = train.restore_params(workdir)
  model = flow_task.build_model(config)
  shape = flow_task.example_shape(config)
  x_T = jax.random.normal(jax.random.PRNGKey(seed), (num_samples, *shape))
  num_classes = config.model.num_classes
  y = jnp.arange(num_samples, dtype=jnp.int32) % num_classes if num_classes else None
  return calibrate(model, params, x_T, y=y, num_steps=config.flow.sample_steps,
                   cfg_scale=config.flow.cfg_scale, shift=config.flow.sample_shift)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a trained flow_images run")
  parser.add_argument("--num-samples", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help=f"the JSON path (default WORKDIR/{FILENAME})")
  args = parser.parse_args(argv)
  result = calibrate_run(args.workdir, args.num_samples, args.seed)
  out = args.out or os.path.join(args.workdir, FILENAME)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {out}: coefficients {result['coefficients']} (rmse {result['rmse']:.4g}, "
        f"R^2 {result['r2']:.3f}{'' if result['calibrated'] else ': uncalibrated'})")


if __name__ == "__main__":
  main()
