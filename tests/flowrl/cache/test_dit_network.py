"""The DiT cut into embed / blocks / head for the caching samplers, and TeaCache's calibration."""
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import flow
from core.nn.dit import DiT, modulate
from flowrl.cache import calibrate, sampling
from tests.core.nn.random_params import random_params

B, H, W, C = 2, 8, 8, 1
STEPS = 8


MODEL = DiT(patch_size=2, width=16, depth=2, num_heads=2, num_classes=3)


@pytest.fixture
def setup(rng):
  model = MODEL
  x = jnp.asarray(rng.normal(size=(B, H, W, C)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=B), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=B), jnp.int32)
  params = random_params(model, rng, x, t, y)
  return model, params, x, t, y


def test_dit_pieces_compose_to_the_model_and_keep_its_parameter_names(setup):
  model, params, x, t, y = setup
  assert sorted(params) == ["block_0", "block_1", "cond", "final", "patch_embed"]
  variables = {"params": params}
  tokens, c = model.apply(variables, x, t, y, method="embed")
  out = model.apply(variables, model.apply(variables, tokens, c, (H // 2, W // 2), method="blocks"), c,
                    (H, W, C), method="head")
  np.testing.assert_array_equal(out, model.apply(variables, x, t, y))


def test_first_block_input_is_block_0s_modulated_layer_norm(setup):
  model, params, x, t, y = setup
  variables = {"params": params}
  tokens, c = model.apply(variables, x, t, y, method="embed")
  m = model.apply(variables, tokens, c, method="first_block_input")
  adaln = params["block_0"]["adaln"]["linear"]
  mod = (jax.nn.silu(c) @ adaln["kernel"] + adaln["bias"]).reshape(B, 6, -1)
  mean, var = tokens.mean(-1, keepdims=True), tokens.var(-1, keepdims=True)
  expected = modulate((tokens - mean) / jnp.sqrt(var + 1e-6), mod[:, 0], mod[:, 1])
  np.testing.assert_allclose(m, expected, rtol=1e-4, atol=1e-4)


def test_full_policy_is_the_guided_euler_sampler(setup):
  model, params, x, _, y = setup
  x0, nfe = sampling.sample(model, params, x, STEPS, sampling.full(), y=y, cfg_scale=2.5)
  velocity = lambda x, t, y: model.apply({"params": params}, x, t, y)
  ref = flow.euler_sample(flow.guided(velocity, y, jnp.full_like(y, 3), 2.5), x, flow.time_grid(STEPS))
  np.testing.assert_allclose(x0, ref, rtol=1e-6, atol=1e-6)
  assert nfe.tolist() == [STEPS] * B


def test_teacache_on_the_dit_runs_the_blocks_only_when_it_computes(setup):
  model, params, x, _, y = setup
  calls = []
  net = sampling.dit_network(model, params, (H, W, C), y=y, cfg_scale=2.0)

  def blocks(h, c):
    jax.debug.callback(lambda h: calls.append(1), h)
    return net.blocks(h, c)

  counted = net._replace(blocks=blocks)
  run = jax.jit(lambda p: sampling.sample_network(counted, x, STEPS, p))
  ref, _ = run(sampling.full())
  calls.clear()
  x0, nfe = run(sampling.teacache(0.0))   # d >= 0: every step computes
  assert int(nfe) == STEPS == len(calls)
  np.testing.assert_allclose(x0, ref, rtol=1e-5, atol=1e-5)
  calls.clear()
  x0, nfe = run(sampling.teacache(1e9))   # only the forced first and last steps
  assert int(nfe) == 2 == len(calls)
  assert np.abs(np.asarray(x0) - np.asarray(ref)).max() > 1e-4


@functools.partial(jax.jit, static_argnums=4)
def _easycache(params, x, y, tau, per_sample):
  """(x0, nfe_B) of MODEL's guided EasyCache sampler at threshold tau (compiled once per shape)."""
  return sampling.sample(MODEL, params, x, STEPS, sampling.EasyCache(tau=tau, warmup=2), y=y,
                         cfg_scale=2.0, per_sample=per_sample)


# One vmapped program for a sweep of thresholds: lax.cond becomes a select, the NFE stay the same.
_easycache_nfe_sweep = jax.jit(jax.vmap(lambda p, x, y, tau: _easycache(p, x, y, tau, True)[1],
                                        in_axes=(None, None, None, 0)))


def test_per_sample_decisions_equal_separate_runs(setup, rng):
  """Per-sample decisions equal one run per sample, at thresholds where the samples' decisions
  differ (where one decision shared by the batch could not match both)."""
  params = setup[1]
  x = jnp.asarray(rng.normal(size=(4, H, W, C)), jnp.float32)
  y = jnp.asarray(rng.permutation(4) % 3, jnp.int32)
  # Thresholds 20% apart over 8 decades, from every step computed to only the forced ones (warm-up
  # and last): each sample's NFE falls at its own thresholds, so some threshold separates two of the
  # four samples.
  taus = np.geomspace(1e-4, 1e4, 100).astype(np.float32)
  nfe_TxB = np.asarray(_easycache_nfe_sweep(params, x, y, taus))
  split = np.flatnonzero(nfe_TxB.min(1) < nfe_TxB.max(1))
  assert split.size, nfe_TxB
  for tau in taus[split[[0, len(split) // 2, -1]]]:
    x0, nfe = _easycache(params, x, y, tau, True)
    for b in range(4):
      xb, nfe_b = _easycache(params, x[b:b + 1], y[b:b + 1], tau, False)
      assert int(nfe[b]) == int(nfe_b[0])
      np.testing.assert_allclose(x0[b], xb[0], rtol=1e-5, atol=1e-5)


def test_dit_network_needs_labels_for_a_conditional_model(setup):
  model, params, *_ = setup
  with pytest.raises(ValueError, match="y"):
    sampling.dit_network(model, params, (H, W, C))


def test_calibration_fit_recovers_a_polynomial(rng):
  coefficients = rng.normal(size=5)
  d_in = rng.uniform(0.01, 0.2, size=(30, 4))
  with warnings.catch_warnings():
    warnings.simplefilter("error")      # a well-spread range: no ill-conditioning warning
    result = calibrate.fit(d_in, np.polyval(coefficients, d_in))
  np.testing.assert_allclose(result["coefficients"], coefficients, rtol=1e-4, atol=1e-6)
  assert result["rmse"] < 1e-8 and result["points"] == 120
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


def test_relative_changes_along_the_trajectory(rng):
  w = jnp.asarray(rng.normal(size=(5, 5)) / 3, jnp.float32)
  fn = lambda x, t: (jnp.tanh(x @ w) * (1 + t[:, None]) - x)[None]
  x_T = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  d_in, d_out = calibrate.relative_changes(sampling.velocity_network(fn), x_T, STEPS)
  grid = np.asarray(flow.time_grid(STEPS))
  xs, vs, x = [], [], np.asarray(x_T)
  for i in range(STEPS):
    v = np.asarray(fn(jnp.asarray(x), jnp.full((3,), grid[i])))[0]
    xs.append(x), vs.append(v)
    x = x + (grid[i + 1] - grid[i]) * v
  change = lambda a: np.abs(np.diff(a, axis=0)).mean(-1) / np.abs(np.asarray(a)[:-1]).mean(-1)
  np.testing.assert_allclose(d_in, change(np.stack(xs)), rtol=1e-4)
  np.testing.assert_allclose(d_out, change(np.stack(vs)), rtol=1e-4)
