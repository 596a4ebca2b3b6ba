"""Slow float64 numpy re-implementations of the caching policies (flowrl/cache/sampling.py), for the tests.

`reference` runs one policy as a plain Python loop over the steps on a network without inside
(`sampling.velocity_network`: TeaCache's signal is x, its residual v - x), given as
np_fn: (x [B, D], t [B]) -> v [K, B, D] in float64.
"""
import numpy as np

from flowrl.cache import vde

# The float32 sampler and the float64 reference must take the same decisions, but a statistic within
# rounding of its threshold may fall on either side (the float32 accumulators differ from the float64
# ones by at most 2e-6 of the threshold, measured over 300 draws, and about 3% of draws have a margin
# below 1e-3, so a few draws in 10^5 had a tie within rounding). A draw whose reference statistic
# comes within TIE_MARGIN (relative) of its threshold at any decision is redrawn.
TIE_MARGIN = 1e-3


def mean_abs(a):
  return np.mean(np.abs(a))


def decompose(v, x):
  """alpha [B], beta [B], u [B, D] of v relative to x, both [B, D] (vde.decompose in float64)."""
  alpha = np.sum(v * x, 1) / np.sum(x * x, 1)
  r = v - alpha[:, None] * x
  r_norm = np.linalg.norm(r, axis=1)
  return alpha, r_norm / np.linalg.norm(x, axis=1), r / r_norm[:, None]


def _interval_change(error, tolerance, decide):
  """-1 above tolerance, +1 below tolerance / 2, else 0 (sampling.interval_change)."""
  if decide(error, tolerance):
    return -1
  return 0 if decide(error, tolerance / 2) else 1


SCHEDULED = ("vde_residual", "vde_budget")


def reference(np_fn, x, grid, kind, combine=lambda v: v[0], margins=None, **kw):
  """Samples x [B, D] along grid [n + 1] with policy `kind`; returns (x0 [B, D], nfe).

  kind: full, vde, vde_adaptive, vde_residual, vde_budget, teacache, easycache or fora, with the
  factory's settings in kw (reorthogonalize for every VDE kind; easycache's branches, the slice of
  branches its k and output scale average, default the conditional one). combine: v [K, B, D] ->
  v [B, D].
  margins: a list that gets |statistic - threshold| / threshold of every dynamic decision.
  On a network without inside every branch's TeaCache signal is x, so the per-branch accumulators
  stay equal and the branches decide alike: one accumulator stands for all of them here.
  """
  def decide(statistic, threshold):
    if margins is not None:
      margins.append(abs(statistic - threshold) / threshold)
    return statistic >= threshold

  n = len(grid) - 1
  stable = kw.get("stable_step")
  nfe, acc = 0, 0.0
  anchors, state = [], {}
  interval, next_full, count = None, None, 0
  branches = kw.get("branches", slice(0, 1))

  def estimate(x, t):
    (t0, a0, b0), (t1, a1, b1) = anchors[-2:]
    alpha = a1 + (t - t1) * (a1 - a0) / (t1 - t0)
    beta = b1 + (t - t1) * (b1 - b0) / (t1 - t0)
    u = state["u"]
    if kw.get("reorthogonalize"):
      u = u - (np.sum(u * x, -1) / np.sum(x * x, -1))[..., None] * x
      u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    return alpha[..., None] * x + (beta * np.linalg.norm(x, axis=1))[..., None] * u

  for i in range(n):
    t, s = grid[i], grid[i + 1]
    last = i == n - 1
    if kind == "full":
      compute = True
    elif kind == "vde":
      compute = i in vde.full_step_indices(n, stable, kw["interval"])
    elif kind == "fora":
      compute = i % kw["n"] == 0
    elif kind == "vde_adaptive":
      compute = i <= stable or last
      if not compute:
        (t0, a0, b0), (t1, a1, b1) = anchors[-2:]
        speed = np.mean(np.abs(a1 - a0) + np.abs(b1 - b0)) / abs(t1 - t0)
        compute = decide(speed * abs(t - t1), kw["tolerance"])
    elif kind in SCHEDULED:
      compute = i <= stable or last or i >= next_full
    elif kind == "teacache":
      compute = last or i == 0
      if not compute:
        acc += np.polyval(kw["coefficients"], mean_abs(x - state["m"]) / mean_abs(state["m"]))
        compute = decide(acc, kw["threshold"])
      acc = 0.0 if compute else acc
      state["m"] = x
    elif kind == "easycache":
      compute = last or i < kw["warmup"]
      if not compute:
        acc += state["k"] * mean_abs(x - state["x_prev"]) / mean_abs(state["v_full"][branches])
        compute = decide(acc, kw["tau"])
      acc = 0.0 if compute else acc
      state["x_prev"] = x
    else:
      raise ValueError(f"unknown kind {kind}")
    t_B = np.full(len(x), t)
    if compute:
      nfe += 1
      v_K = np_fn(x, t_B)
      if kind in SCHEDULED:
        change = 0
        if i > stable:
          error = np.linalg.norm(estimate(x, t) - v_K) / np.linalg.norm(v_K)
          change = _interval_change(error, kw["tolerance"], decide)
        count += 1
        if kind == "vde_residual":
          interval = max(1, (interval if i > stable else kw["interval"]) + change)
        else:
          remaining, steps = kw["budget"] - count, n - 1 - i
          interval = (max(steps, 1) if remaining <= 1
                      else max(1, (2 * steps + remaining) // (2 * remaining) + change))
        next_full = i + interval
      if kind.startswith("vde"):
        parts = [decompose(v, x) for v in v_K]   # every branch on its own
        if i >= stable - 1:
          anchors.append((t, np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])))
        state["u"] = np.stack([p[2] for p in parts])
      if kind == "easycache" and "v_full" in state:
        state["k"] = (mean_abs(v_K[branches] - state["v_full"][branches])
                      / mean_abs(x - state["x_full"]))
      state["x_full"], state["v_full"] = x, v_K
    elif kind.startswith("vde"):
      v_K = estimate(x, t)
    else:   # teacache and fora (residual v - x at this cut) and easycache (delta v - x) estimate alike
      v_K = x + (state["v_full"] - state["x_full"])
    x = x + (s - t) * combine(v_K)
  return x, nfe
