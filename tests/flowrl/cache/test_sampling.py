"""The caching sampler and its policies (flowrl/cache/sampling.py) against slow numpy re-implementations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import flow
from flowrl.cache import sampling, vde

STEPS = 20
B, D = 3, 6


# ----------------------------------------------------------------------------------------------
# A random nonlinear velocity field with one or two branches, in numpy (float64) and in JAX.


def _field(rng, num_branches=1):
  """(numpy fn, jax fn): (x [B, D], t [B]) -> v [K, B, D], v_k = tanh(x W_k) (1 + t) - c_k x."""
  w = rng.normal(size=(num_branches, D, D)) / np.sqrt(D)
  c = rng.uniform(0.2, 1.0, size=num_branches)

  def np_fn(x, t):
    return np.stack([np.tanh(x @ w[k]) * (1 + t[:, None]) - c[k] * x for k in range(num_branches)])

  w32, c32 = jnp.asarray(w, jnp.float32), jnp.asarray(c, jnp.float32)

  def jax_fn(x, t):
    return jnp.tanh(jnp.einsum("bd,kde->kbe", x, w32)) * (1 + t[:, None]) - c32[:, None, None] * x

  return np_fn, jax_fn


def _counted(fn, calls):
  """fn that appends to `calls` on the host each time it really runs (not when it is traced)."""
  def wrapped(x, t):
    jax.debug.callback(lambda x: calls.append(1), x)
    return fn(x, t)
  return wrapped


def _mean_abs(a):
  return np.mean(np.abs(a))


def _decompose_np(v, x):
  alpha = np.sum(v * x, 1) / np.sum(x * x, 1)
  r = v - alpha[:, None] * x
  r_norm = np.linalg.norm(r, axis=1)
  return alpha, r_norm / np.linalg.norm(x, axis=1), r / r_norm[:, None]


def _reference(np_fn, x, grid, kind, combine=lambda v: v[0], margins=None, **kw):
  """Slow numpy sampler for one policy; returns (x0, nfe).

  margins: a list that gets |statistic - threshold| / threshold of every dynamic decision.
  """
  def decide(statistic, threshold):
    if margins is not None:
      margins.append(abs(statistic - threshold) / threshold)
    return statistic >= threshold

  n = len(grid) - 1
  nfe, acc = 0, 0.0
  anchors, state = [], {}
  for i in range(n):
    t, s = grid[i], grid[i + 1]
    forced = i == n - 1
    if kind == "vde":
      compute = i in vde.full_step_indices(n, kw["stable_step"], kw["interval"])
    elif kind == "vde_adaptive":
      compute = i <= kw["stable_step"] or forced
      if not compute:
        (t0, a0, b0), (t1, a1, b1) = anchors[-2:]
        speed = np.mean(np.abs(a1 - a0) + np.abs(b1 - b0)) / abs(t1 - t0)
        compute = decide(speed * abs(t - t1), kw["tolerance"])
    elif kind == "teacache":
      compute = forced or i == 0
      if not compute:
        acc += np.polyval(kw["coefficients"], _mean_abs(x - state["m"]) / _mean_abs(state["m"]))
        compute = decide(acc, kw["threshold"])
      acc = 0.0 if compute else acc
      state["m"] = x
    elif kind == "easycache":
      compute = forced or i < kw["warmup"]
      if not compute:
        acc += state["k"] * _mean_abs(x - state["x_prev"]) / _mean_abs(state["v_full"])
        compute = decide(acc, kw["tau"])
      acc = 0.0 if compute else acc
      state["x_prev"] = x
    t_B = np.full(len(x), t)
    if compute:
      nfe += 1
      v_K = np_fn(x, t_B)
      if kind.startswith("vde"):
        parts = [_decompose_np(v, x) for v in v_K]   # every branch on its own
        if i >= kw["stable_step"] - 1:
          anchors.append((t, np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])))
        state["u"] = np.stack([p[2] for p in parts])
      if kind == "easycache" and "v_full" in state:
        state["k"] = _mean_abs(v_K - state["v_full"]) / _mean_abs(x - state["x_full"])
      state["x_full"], state["v_full"] = x, v_K
    elif kind.startswith("vde"):
      (t0, a0, b0), (t1, a1, b1) = anchors[-2:]
      alpha = a1 + (t - t1) * (a1 - a0) / (t1 - t0)
      beta = b1 + (t - t1) * (b1 - b0) / (t1 - t0)
      v_K = alpha[..., None] * x + (beta * np.linalg.norm(x, axis=1))[..., None] * state["u"]
    else:   # teacache (residual v - x at this cut) and easycache (delta v - x) estimate alike
      v_K = x + (state["v_full"] - state["x_full"])
    x = x + (s - t) * combine(v_K)
  return x, nfe


def _run(net, x, policy, num_steps=STEPS):
  return jax.jit(lambda x, p: sampling.sample_network(net, x, num_steps, p))(jnp.asarray(x, jnp.float32),
                                                                            policy)


# The float32 sampler and the float64 reference must take the same decisions, but a statistic within
# rounding of its threshold may fall on either side (the float32 accumulators differ from the float64
# ones by at most 2e-6 of the threshold, measured over 300 draws, and about 3% of draws have a margin
# below 1e-3, so a few draws in 10^5 had a tie within rounding). A draw whose reference statistic
# comes within TIE_MARGIN (relative) of its threshold at any decision is redrawn.
TIE_MARGIN = 1e-3


def _draw_away_from_ties(rng, kind, **kw):
  """(np_fn, jax_fn, x_T, ref, ref_nfe): a field and x_T whose reference run has no near-tie."""
  grid = np.asarray(flow.time_grid(STEPS), np.float64)
  for _ in range(50):                                    # P(50 redraws) < 1e-70
    np_fn, jax_fn = _field(rng)
    x_T = rng.normal(size=(B, D))
    margins = []
    ref, ref_nfe = _reference(np_fn, x_T, grid, kind, margins=margins, **kw)
    if min(margins, default=np.inf) >= TIE_MARGIN:
      return np_fn, jax_fn, x_T, ref, ref_nfe
  raise AssertionError(f"no draw without a near-tie in 50 tries ({kind})")


POLICIES = {
    "vde": (lambda: sampling.vde(stable_step=3, interval=4), dict(stable_step=3, interval=4)),
    "vde_adaptive": (lambda: sampling.vde_adaptive(0.3, stable_step=3),
                     dict(stable_step=3, tolerance=0.3)),
    "teacache": (lambda: sampling.teacache(0.25, (0.5, 1.5, 0.0)),
                 dict(threshold=0.25, coefficients=(0.5, 1.5, 0.0))),
    "easycache": (lambda: sampling.easycache(0.3, warmup=3), dict(tau=0.3, warmup=3)),
}


@pytest.mark.parametrize("kind", POLICIES)
def test_policy_matches_numpy_reference_and_really_skips_the_network(rng, kind):
  make, kw = POLICIES[kind]
  np_fn, jax_fn, x_T, ref, ref_nfe = _draw_away_from_ties(rng, kind, **kw)
  calls = []
  net = sampling.velocity_network(_counted(jax_fn, calls))
  x0, nfe = _run(net, x_T, make())
  assert int(nfe) == ref_nfe == len(calls), (int(nfe), ref_nfe, len(calls))
  assert 2 < ref_nfe < STEPS   # the settings skip some steps and compute some
  np.testing.assert_allclose(x0, ref, rtol=1e-4, atol=1e-4)
  # Not a sampler that just follows the field: skipping changed the result.
  full = _reference(np_fn, x_T, np.asarray(flow.time_grid(STEPS), np.float64), "vde",
                    stable_step=STEPS - 1, interval=1)[0]
  assert np.abs(full - ref).max() > 1e-3


def test_vde_decomposes_guidance_branches_separately(rng):
  np_fn, jax_fn = _field(rng, num_branches=2)
  scale = 3.0
  combine = lambda v: scale * v[0] + (1 - scale) * v[1]
  net = sampling.velocity_network(jax_fn, sampling.guidance(scale))
  x_T = rng.normal(size=(B, D))
  grid = np.asarray(flow.time_grid(STEPS), np.float64)
  x0, nfe = _run(net, x_T, sampling.vde(stable_step=2, interval=5))
  kw = dict(stable_step=2, interval=5)
  ref, ref_nfe = _reference(np_fn, x_T, grid, "vde", combine, **kw)
  np.testing.assert_allclose(x0, ref, rtol=1e-4, atol=1e-4)
  # Decomposing the already guided velocity would be another (wrong) sampler.
  mixed, _ = _reference(lambda x, t: combine(np_fn(x, t))[None], x_T, grid, "vde", **kw)
  assert np.abs(mixed - ref).max() > 1e-3


def test_vde_is_exact_for_a_field_linear_in_x_with_scalars_linear_in_t(rng):
  # |alpha| <= 2. Exact in exact arithmetic; in float32 the extrapolation from anchors 1/30 apart
  # multiplies alpha's rounding (a few ulp of |alpha|) by the lever |t - t_last| / (t_last - t_prev):
  # summed over the skipped steps, about 27 for the adaptive schedule (anchors at steps 1 and 2, all
  # later steps extrapolated), 27 * 4 ulp * 2 = 1.3e-5 of x0. Its rtol is twice that (with normal
  # a0, a1 and rtol 1e-5, 1 draw in 400 failed); VDE's fixed schedule re-anchors every 5 steps.
  a0, a1 = rng.uniform(-1, 1, size=(2, B, 1))
  fn = lambda x, t: ((a0 + a1 * t[:, None]) * x)[None]   # alpha(t) per sample, beta = 0
  net = sampling.velocity_network(fn)
  x_T = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  ref, _ = _run(net, x_T, sampling.full(), num_steps=30)
  for policy, rtol in ((sampling.vde(6, 5), 1e-5), (sampling.vde_adaptive(1e3, stable_step=2), 3e-5)):
    x0, nfe = _run(net, x_T, policy, num_steps=30)
    assert int(nfe) < 30
    np.testing.assert_allclose(x0, ref, rtol=rtol, atol=1e-5)


def test_full_is_core_flow_euler_and_fewer_steps_its_shorter_grid(rng):
  _, jax_fn = _field(rng, num_branches=2)
  scale = float(rng.uniform(1.5, 4))
  net = sampling.velocity_network(jax_fn, sampling.guidance(scale))
  x_T = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  guided = lambda x, t: scale * jax_fn(x, t)[0] + (1 - scale) * jax_fn(x, t)[1]
  for policy, steps in ((sampling.full(), STEPS), (sampling.fewer_steps(7), 7)):
    x0, nfe = _run(net, x_T, policy)
    ref = jax.jit(flow.euler_sample, static_argnums=0)(guided, x_T, flow.time_grid(steps, shift=1.0))
    np.testing.assert_array_equal(x0, ref)
    assert int(nfe) == steps


def test_static_schedules_hold_no_network_call_at_skipped_steps(rng):
  _, jax_fn = _field(rng)
  traced, calls = [], []

  def fn(x, t):
    traced.append(1)   # once per call site in the traced program
    return _counted(jax_fn, calls)(x, t)

  net = sampling.velocity_network(fn)
  x_T = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  for policy, expected in ((sampling.vde(2, 3), len(vde.full_step_indices(STEPS, 2, 3))),
                           (sampling.fora(3), len(range(0, STEPS, 3)))):
    traced.clear(), calls.clear()
    _, nfe = jax.jit(lambda x: sampling.sample_network(net, x, STEPS, policy))(x_T)
    assert int(nfe) == expected == len(calls) == len(traced) - 1   # eval_shape traces it once more


def test_extreme_thresholds(rng):
  _, jax_fn = _field(rng)
  net = sampling.velocity_network(jax_fn)
  x_T = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  ref, _ = _run(net, x_T, sampling.full())
  for policy in (sampling.teacache(0.0), sampling.easycache(0.0), sampling.vde_adaptive(0.0)):
    x0, nfe = _run(net, x_T, policy)
    assert int(nfe) == STEPS
    np.testing.assert_allclose(x0, ref, rtol=1e-5, atol=1e-6)
  for policy, nfe_min in ((sampling.teacache(1e9), 2), (sampling.easycache(1e9, warmup=3), 4),
                          (sampling.vde_adaptive(1e9, stable_step=4), 6)):
    assert int(_run(net, x_T, policy)[1]) == nfe_min


@pytest.mark.parametrize("update", ["teacache", "easycache"])
def test_accumulators_against_a_loop_on_random_sequences(rng, update):
  # Every input is a dyadic rational of few bits, so float32 computes each increment and partial sum
  # exactly, as float64 does: decisions and accumulators must match the loop bit for bit, exact ties
  # acc == threshold (which >= computes) included. Each increment lies in [0.06, 0.39] for the
  # threshold 0.5: the unforced step after a reset never computes, 9 unforced steps in a row always do.
  n, threshold = 40, 0.5
  forced = rng.uniform(size=n) < 0.1
  forced[:10] = False                                   # the first computation is the accumulator's
  if update == "teacache":
    # a d^2 + b d + c with a in [-1, 1], b in [0, 1], c in [0.1, 0.15] on d in [0, 0.2]: in [0.06, 0.39].
    coefficients = np.array([rng.integers(-16, 17) / 16, rng.integers(0, 17) / 16,
                             rng.integers(26, 39) / 256])
    signal = rng.integers(0, 52, size=n) / 256
    increments = np.polyval(coefficients, signal)
  else:
    k, scale = rng.integers(8, 33) / 16, 2.0 ** rng.integers(-1, 2)   # k in [0.5, 2], scale 1/2, 1, 2
    # k d / scale in [1/16, 3/8]
    lo, hi = int(np.ceil(1024 * scale / (16 * k))), int(np.floor(1024 * 3 * scale / (8 * k)))
    signal = rng.integers(lo, hi + 1, size=n) / 1024
    increments = k * signal / scale
  assert 0.06 <= increments.min() and increments.max() <= 0.39
  acc, expected = 0.0, []
  for p, f in zip(increments, forced):
    acc += p
    compute = bool(f or acc >= threshold)
    acc = 0.0 if compute else acc
    expected.append((compute, acc))
  acc, got = jnp.float32(0), []
  for d, f in zip(signal, forced):
    if update == "teacache":
      compute, acc = sampling.teacache_update(acc, d, coefficients, threshold, f)
    else:
      compute, acc = sampling.easycache_update(acc, k, d, scale, threshold, f)
    got.append((bool(compute), float(acc)))
  assert [c for c, _ in got] == [c for c, _ in expected]
  assert 0 < sum(c for c, _ in got) < n
  np.testing.assert_array_equal([a for _, a in got], [a for _, a in expected])


@pytest.mark.parametrize("make,match", [
    (lambda: sampling.vde(0, 3), "stable_step"), (lambda: sampling.vde(6, 0), "interval"),
    (lambda: sampling.vde_adaptive(-1.0), "tolerance"), (lambda: sampling.teacache(-0.1), "threshold"),
    (lambda: sampling.teacache(0.1, [[1.0]]), "coefficients"),
    (lambda: sampling.easycache(0.1, warmup=1), "warmup"), (lambda: sampling.fewer_steps(0), "n "),
    (lambda: sampling.fora(0), "n "), (lambda: sampling.easycache("0.1"), "tau")])
def test_policies_reject_bad_settings(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize("policy,steps,match", [
    (sampling.vde(6, 3), 6, "stable_step"), (sampling.vde_adaptive(0.1), 5, "stable_step"),
    (sampling.easycache(0.1, warmup=4), 4, "warmup"), (sampling.full(), 1, "num_steps")])
def test_sampler_rejects_settings_that_do_not_fit_the_steps(rng, policy, steps, match):
  net = sampling.velocity_network(_field(rng)[1])
  with pytest.raises(ValueError, match=match):
    sampling.sample_network(net, jnp.ones((B, D)), steps, policy)


def test_sample_takes_a_policy_by_name_and_checks_its_inputs(rng):
  """A policy name gets the constructor's defaults (the same samples as the object); y and x_T are
  checked against the batch, the classes and the model's input, each with one clear error."""
  from core.nn.dit import DiT
  from tests.core.nn.random_params import random_params
  model = DiT(patch_size=2, width=16, depth=2, num_heads=2, num_classes=3)
  x_T = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=2), jnp.int32)
  params = random_params(model, rng, x_T, jnp.zeros(2), y)
  by_name = sampling.sample(model, params, x_T, 8, "vde", y=y, cfg_scale=2.0)
  by_object = sampling.sample(model, params, x_T, 8, sampling.vde(), y=y, cfg_scale=2.0)
  for a, b in zip(by_name, by_object):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="policy 'teacache' has no default threshold"):
    sampling.sample(model, params, x_T, 8, "teacache", y=y)
  with pytest.raises(ValueError, match="unknown policy 'vdee'; expected one of easycache, "):
    sampling.sample(model, params, x_T, 8, "vdee", y=y)
  with pytest.raises(ValueError, match=r"y must be int labels \[B\] = \[2\] .* got int32 \(3,\)"):
    sampling.sample(model, params, x_T, 8, "full", y=jnp.zeros(3, jnp.int32), cfg_scale=2.0)
  with pytest.raises(ValueError, match=r"y must lie in \[0, 3\) .* got values in \[0, 3\]"):
    sampling.sample(model, params, x_T, 8, "full", y=jnp.asarray([0, 3], jnp.int32))
  with pytest.raises(ValueError, match="y .* is required by a class-conditional model"):
    sampling.sample(model, params, x_T, 8, "full")
  with pytest.raises(ValueError, match=r"does not fit the model: it takes \[B, H, W, 1\] with H "
                                       r"and W multiples of its patch size 2"):
    sampling.sample(model, params, jnp.zeros((2, 8, 8, 3)), 8, "full", y=y)
  with pytest.raises(ValueError, match="does not fit the model"):
    sampling.sample(model, params, jnp.zeros((2, 7, 8, 1)), 8, "full", y=y)
