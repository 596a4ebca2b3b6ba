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


def _reference(np_fn, x, grid, kind, combine=lambda v: v[0], **kw):
  """Slow numpy sampler for one policy; returns (x0, nfe)."""
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
        compute = speed * abs(t - t1) >= kw["tolerance"]
    elif kind == "teacache":
      compute = forced or i == 0
      if not compute:
        acc += np.polyval(kw["coefficients"], _mean_abs(x - state["m"]) / _mean_abs(state["m"]))
        compute = acc >= kw["threshold"]
      acc = 0.0 if compute else acc
      state["m"] = x
    elif kind == "easycache":
      compute = forced or i < kw["warmup"]
      if not compute:
        acc += state["k"] * _mean_abs(x - state["x_prev"]) / _mean_abs(state["v_full"])
        compute = acc >= kw["tau"]
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
  np_fn, jax_fn = _field(rng)
  calls = []
  net = sampling.velocity_network(_counted(jax_fn, calls))
  make, kw = POLICIES[kind]
  x_T = rng.normal(size=(B, D))
  x0, nfe = _run(net, x_T, make())
  ref, ref_nfe = _reference(np_fn, x_T, np.asarray(flow.time_grid(STEPS), np.float64), kind, **kw)
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
  a0, a1 = rng.normal(size=(2, B, 1))
  fn = lambda x, t: ((a0 + a1 * t[:, None]) * x)[None]   # alpha(t) per sample, beta = 0
  net = sampling.velocity_network(fn)
  x_T = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
  ref, _ = _run(net, x_T, sampling.full(), num_steps=30)
  for policy in (sampling.vde(6, 5), sampling.vde_adaptive(1e3, stable_step=2)):
    x0, nfe = _run(net, x_T, policy, num_steps=30)
    assert int(nfe) < 30
    np.testing.assert_allclose(x0, ref, rtol=1e-5, atol=1e-5)


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
  n = 40
  signal = rng.uniform(0, 0.2, size=n)
  forced = rng.uniform(size=n) < 0.1
  threshold = 0.5
  coefficients = rng.normal(size=3)
  k, scale = rng.uniform(0.5, 2), rng.uniform(0.5, 2)
  acc, expected = 0.0, []
  for d, f in zip(signal, forced):
    acc += np.polyval(coefficients, d) if update == "teacache" else k * d / scale
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
  np.testing.assert_allclose([a for _, a in got], [a for _, a in expected], rtol=1e-5, atol=1e-6)


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
