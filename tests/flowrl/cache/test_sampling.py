"""The caching sampler and its policies (flowrl/cache/sampling.py) against slow numpy re-implementations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import flow
from flowrl.cache import sampling, vde
from tests.flowrl.cache.reference import TIE_MARGIN, reference

STEPS = 20
B, D = 3, 6


# ----------------------------------------------------------------------------------------------
# A random nonlinear velocity field with one or two branches, in numpy (float64) and in JAX.


def _field(rng, num_branches=1):
  """(numpy fn, jax fn): v_k = tanh(x W_k) (1 + t) - c_k x for branch k.

  numpy: (x [B, D], t [B]) -> v [K, B, D]. jax: (x [N, D], t [N]) -> v [N, D] of branch 0, or with
  two branches (x, t, k [N]) -> v [N, D] of each row's branch k (the condition of `_network`).
  """
  w = rng.normal(size=(num_branches, D, D)) / np.sqrt(D)
  c = rng.uniform(0.2, 1.0, size=num_branches)

  def np_fn(x, t):
    return np.stack([np.tanh(x @ w[k]) * (1 + t[:, None]) - c[k] * x for k in range(num_branches)])

  w32, c32 = jnp.asarray(w, jnp.float32), jnp.asarray(c, jnp.float32)

  def jax_fn(x, t, k=None):
    k = jnp.zeros(x.shape[0], jnp.int32) if k is None else k
    return jnp.tanh(jnp.einsum("nd,nde->ne", x, w32[k])) * (1 + t[:, None]) - c32[k][:, None] * x

  return np_fn, jax_fn


def _network(jax_fn, scale=None):
  """velocity_network of a `_field`: one branch, or guided with branches [0; 1] (the label is k)."""
  if scale is None:
    return sampling.velocity_network(lambda x, t: jax_fn(x, t))
  return sampling.velocity_network(jax_fn, cond=jnp.zeros(B, jnp.int32), null_cond=1, cfg_scale=scale)


def _guided(scale):
  return lambda v: scale * v[0] + (1 - scale) * v[1]


def _counted(fn, calls):
  """fn that appends to `calls` on the host each time it really runs (not when it is traced)."""
  def wrapped(x, *args):
    jax.debug.callback(lambda x: calls.append(1), x)
    return fn(x, *args)
  return wrapped


def _run(net, x, policy, num_steps=STEPS):
  return jax.jit(lambda x, p: sampling.sample_network(net, x, num_steps, p))(jnp.asarray(x, jnp.float32),
                                                                            policy)


def _draw_away_from_ties(rng, kind, num_branches=1, accept=lambda np_fn, x_T: True, **kw):
  """(np_fn, jax_fn, x_T, ref, ref_nfe): a field and x_T whose reference run has no near-tie (and
  that `accept`s). Two branches are mixed with guidance scale 3."""
  grid = np.asarray(flow.time_grid(STEPS), np.float64)
  combine = _guided(3.0) if num_branches == 2 else (lambda v: v[0])
  for _ in range(50):                                    # P(50 redraws) < 1e-70
    np_fn, jax_fn = _field(rng, num_branches)
    x_T = rng.normal(size=(B, D))
    margins = []
    ref, ref_nfe = reference(np_fn, x_T, grid, kind, combine, margins=margins, **kw)
    if min(margins, default=np.inf) >= TIE_MARGIN and accept(np_fn, x_T):
      return np_fn, jax_fn, x_T, ref, ref_nfe
  raise AssertionError(f"no draw without a near-tie in 50 tries ({kind})")


# name: (policy, the reference's kind and settings)
POLICIES = {
    "vde": (lambda: sampling.vde(stable_step=3, interval=4), "vde", dict(stable_step=3, interval=4)),
    "vde_reorthogonal": (lambda: sampling.vde(stable_step=3, interval=4, reorthogonalize=True), "vde",
                         dict(stable_step=3, interval=4, reorthogonalize=True)),
    "vde_adaptive": (lambda: sampling.vde_adaptive(0.3, stable_step=3), "vde_adaptive",
                     dict(stable_step=3, tolerance=0.3)),
    "vde_residual": (lambda: sampling.vde_residual(0.1, stable_step=3, interval=2), "vde_residual",
                     dict(stable_step=3, interval=2, tolerance=0.1)),
    "vde_budget": (lambda: sampling.vde_budget(9, 0.1, stable_step=3), "vde_budget",
                   dict(stable_step=3, budget=9, tolerance=0.1)),
    "teacache": (lambda: sampling.teacache(0.25, (0.5, 1.5, 0.0)), "teacache",
                 dict(threshold=0.25, coefficients=(0.5, 1.5, 0.0))),
    "easycache": (lambda: sampling.easycache(0.3, warmup=3), "easycache", dict(tau=0.3, warmup=3)),
}


@pytest.mark.parametrize("name", POLICIES)
def test_policy_matches_numpy_reference_and_really_skips_the_network(rng, name):
  make, kind, kw = POLICIES[name]
  np_fn, jax_fn, x_T, ref, ref_nfe = _draw_away_from_ties(rng, kind, **kw)
  calls = []
  net = sampling.velocity_network(_counted(jax_fn, calls))
  x0, nfe = _run(net, x_T, make())
  assert float(nfe) == ref_nfe == len(calls), (float(nfe), ref_nfe, len(calls))
  assert 2 < ref_nfe < STEPS   # the settings skip some steps and compute some
  np.testing.assert_allclose(x0, ref, rtol=1e-4, atol=1e-4)
  # Not a sampler that just follows the field: skipping changed the result.
  full = reference(np_fn, x_T, np.asarray(flow.time_grid(STEPS), np.float64), "full")[0]
  assert np.abs(full - ref).max() > 1e-3


def test_vde_decomposes_guidance_branches_separately(rng):
  np_fn, jax_fn = _field(rng, num_branches=2)
  scale = 3.0
  combine = _guided(scale)
  net = _network(jax_fn, scale)
  x_T = rng.normal(size=(B, D))
  grid = np.asarray(flow.time_grid(STEPS), np.float64)
  x0, nfe = _run(net, x_T, sampling.vde(stable_step=2, interval=5))
  kw = dict(stable_step=2, interval=5)
  ref, ref_nfe = reference(np_fn, x_T, grid, "vde", combine, **kw)
  np.testing.assert_allclose(x0, ref, rtol=1e-4, atol=1e-4)
  # Decomposing the already guided velocity would be another (wrong) sampler.
  mixed, _ = reference(lambda x, t: combine(np_fn(x, t))[None], x_T, grid, "vde", **kw)
  assert np.abs(mixed - ref).max() > 1e-3


def test_easycache_decides_on_the_conditional_branch(rng):
  """With guidance, k and the output scale come from the conditional branch alone (as the public
  code's "even" calls): the draw is one where deciding on both branches would differ."""
  grid = np.asarray(flow.time_grid(STEPS), np.float64)
  kw = dict(tau=0.3, warmup=3)

  def both_branches_differ(np_fn, x_T):
    run = lambda **more: reference(np_fn, x_T, grid, "easycache", _guided(3.0), **kw, **more)[1]
    return run(branches=slice(None)) != run()

  np_fn, jax_fn, x_T, ref, ref_nfe = _draw_away_from_ties(rng, "easycache", 2, both_branches_differ,
                                                          **kw)
  x0, nfe = _run(_network(jax_fn, 3.0), x_T, sampling.easycache(**kw))
  assert float(nfe) == ref_nfe
  np.testing.assert_allclose(x0, ref, rtol=1e-4, atol=1e-4)


def _evaluated_steps(fn, grid):
  """(fn recording the time of every real call, the list of the steps called, filled on run)."""
  times = []
  def wrapped(x, t):
    jax.debug.callback(lambda t: times.append(float(t[0])), t)
    return fn(x, t)
  return wrapped, lambda: [int(np.argmin(np.abs(np.asarray(grid) - t))) for t in times]


def test_residual_rule_lengthens_the_interval_where_vde_is_exact(rng):
  """Where the estimate is exact (v = alpha(t) x, alpha linear in t) the residual is ~0: each full
  evaluation after the warm-up lengthens the interval by one (interval, interval + 1, ...)."""
  # |alpha| >= 1/2 on [0, 1]: no zero of v, where the relative residual would be rounding over ~0.
  a0 = rng.uniform(1, 2, size=(B, 1)) * rng.choice([-1, 1], size=(B, 1))
  a1 = rng.uniform(-0.5, 0.5, size=(B, 1))
  grid = flow.time_grid(30)
  fn, steps = _evaluated_steps(lambda x, t: (a0 + a1 * t[:, None]) * x, grid)
  stable, interval = int(rng.integers(1, 5)), int(rng.integers(1, 4))
  _, nfe = _run(sampling.velocity_network(fn), rng.normal(size=(B, D)),
                sampling.vde_residual(0.5, stable_step=stable, interval=interval), num_steps=30)
  expected = list(range(stable + 1))
  while expected[-1] + interval < 29:
    expected.append(expected[-1] + interval)
    interval += 1
  assert steps() == expected + [29] and float(nfe) == len(expected) + 1


def test_budget_rule_spends_exactly_its_budget_when_the_residual_always_shortens(rng):
  """tolerance 0: every residual > 0 shortens (-1), so the budget runs out before the last step
  and the last interval jumps to it: NFE = budget exactly. A huge tolerance lengthens every
  interval (+1) and stays within the budget."""
  _, jax_fn = _field(rng)
  net = _network(jax_fn)
  x_T = rng.normal(size=(B, D))
  stable = int(rng.integers(1, 6))
  for budget in rng.choice(np.arange(stable + 2, STEPS + 1), size=2, replace=False):
    assert float(_run(net, x_T, sampling.vde_budget(int(budget), 0.0, stable))[1]) == budget
    assert float(_run(net, x_T, sampling.vde_budget(int(budget), 1e9, stable))[1]) <= budget


def test_interval_change_has_a_dead_band():
  error = jnp.asarray([0.0, 0.49, 0.5, 0.75, 1.0, 1.01, 5.0])
  np.testing.assert_array_equal(sampling.interval_change(error, 1.0), [1, 1, 0, 0, 0, -1, -1])


def test_vde_is_exact_for_a_field_linear_in_x_with_scalars_linear_in_t(rng):
  # |alpha| <= 2. Exact in exact arithmetic; in float32 the extrapolation from anchors 1/30 apart
  # multiplies alpha's rounding (a few ulp of |alpha|) by the lever |t - t_last| / (t_last - t_prev):
  # summed over the skipped steps, about 27 for the adaptive schedule (anchors at steps 1 and 2, all
  # later steps extrapolated), 27 * 4 ulp * 2 = 1.3e-5 of x0. Its rtol is twice that (with normal
  # a0, a1 and rtol 1e-5, 1 draw in 400 failed); VDE's fixed schedule re-anchors every 5 steps.
  a0, a1 = rng.uniform(-1, 1, size=(2, B, 1))
  fn = lambda x, t: (a0 + a1 * t[:, None]) * x   # alpha(t) per sample, beta = 0
  net = sampling.velocity_network(fn)
  x_T = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  ref, _ = _run(net, x_T, sampling.full(), num_steps=30)
  for policy, rtol in ((sampling.vde(6, 5), 1e-5), (sampling.vde_adaptive(1e3, stable_step=2), 3e-5)):
    x0, nfe = _run(net, x_T, policy, num_steps=30)
    assert float(nfe) < 30
    np.testing.assert_allclose(x0, ref, rtol=rtol, atol=1e-5)


def test_full_is_core_flow_euler_and_fewer_steps_its_shorter_grid(rng):
  _, jax_fn = _field(rng, num_branches=2)
  scale = float(rng.uniform(1.5, 4))
  net = _network(jax_fn, scale)
  x_T = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  branch = lambda k: jnp.full(B, k, jnp.int32)
  guided = lambda x, t: scale * jax_fn(x, t, branch(0)) + (1 - scale) * jax_fn(x, t, branch(1))
  for policy, steps in ((sampling.full(), STEPS), (sampling.fewer_steps(7), 7)):
    x0, nfe = _run(net, x_T, policy)
    ref = jax.jit(flow.euler_sample, static_argnums=0)(guided, x_T, flow.time_grid(steps, shift=1.0))
    np.testing.assert_allclose(x0, ref, rtol=1e-6, atol=1e-6)
    assert float(nfe) == steps


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
    (lambda: sampling.fora(0), "n "), (lambda: sampling.easycache("0.1"), "tau"),
    (lambda: sampling.vde(6, 3, reorthogonalize=1), "reorthogonalize"),
    (lambda: sampling.vde_residual(-0.1), "tolerance"),
    (lambda: sampling.vde_residual(0.1, interval=0), "interval"),
    (lambda: sampling.vde_budget(7, 0.1, stable_step=6), r"budget .* must be an int >= 8"),
    (lambda: sampling.vde_budget(10, None), "tolerance")])
def test_policies_reject_bad_settings(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize("policy,steps,match", [
    (sampling.vde(6, 3), 6, "stable_step"), (sampling.vde_adaptive(0.1), 5, "stable_step"),
    (sampling.easycache(0.1, warmup=4), 4, "warmup"), (sampling.full(), 1, "num_steps"),
    (sampling.vde_residual(0.1), 6, "stable_step"), (sampling.vde_budget(12, 0.1), 11, "budget")])
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
