"""The DiT cut into embed / blocks / head for the caching samplers, and policies on it against loops."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import flow
from core.nn.dit import DiT, modulate
from flowrl.cache import sampling
from tests.core.nn.random_params import random_params
from tests.flowrl.cache.reference import TIE_MARGIN, reference

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
  assert float(nfe) == STEPS == len(calls)
  np.testing.assert_allclose(x0, ref, rtol=1e-5, atol=1e-5)
  calls.clear()
  x0, nfe = run(sampling.teacache(1e9))   # only the forced first and last steps
  assert float(nfe) == 2 == len(calls)
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


# ----------------------------------------------------------------------------------------------
# The adaptive VDE rules and TeaCache's per-branch decisions on the guided DiT, against Python loops.

RULE_STEPS = 12
RULES = {"vde_residual": (lambda: sampling.vde_residual(0.2, stable_step=2, interval=2),
                          dict(stable_step=2, interval=2, tolerance=0.2)),
         "vde_budget": (lambda: sampling.vde_budget(7, 0.2, stable_step=2),
                        dict(stable_step=2, budget=7, tolerance=0.2))}


@jax.jit
def _guided_velocity(params, x_BxD, t_B, y):
  """MODEL's branches [2, B, H * W * C] at flat inputs x [B, H * W * C], CFG scale 2."""
  net = sampling.dit_network(MODEL, params, (H, W, C), y=y, cfg_scale=2.0)
  return sampling.network_velocity(net, x_BxD.reshape(-1, H, W, C), t_B).reshape(2, x_BxD.shape[0], -1)


@pytest.mark.parametrize("name", RULES)
def test_adaptive_vde_rules_on_the_dit_match_a_python_loop(rng, name):
  """The residual and budget rules on the guided DiT (random weights of scale 0.1, whose VDE
  residuals, 0.1 - 0.5, straddle the tolerance) against the float64 loop around the DiT's
  velocity: the same NFE and samples. Draws with a residual within TIE_MARGIN of a threshold are
  redrawn."""
  make, kw = RULES[name]
  grid = np.asarray(flow.time_grid(RULE_STEPS), np.float64)
  y = jnp.asarray(rng.integers(0, 3, size=B), jnp.int32)
  for _ in range(20):
    params = random_params(MODEL, rng, jnp.zeros((B, H, W, C)), jnp.zeros(B), y, scale=0.1)
    x_T = rng.normal(size=(B, H * W * C))
    np_fn = lambda x, t: np.asarray(_guided_velocity(params, jnp.asarray(x, jnp.float32),
                                                     jnp.asarray(t, jnp.float32), y), np.float64)
    margins = []
    ref, ref_nfe = reference(np_fn, x_T, grid, name, lambda v: 2.0 * v[0] - v[1], margins=margins,
                             **kw)
    if min(margins) >= TIE_MARGIN:
      break
  else:
    raise AssertionError("no draw without a near-tie in 20 tries")
  x0, nfe = sampling.sample(MODEL, params, jnp.asarray(x_T, jnp.float32).reshape(B, H, W, C),
                            RULE_STEPS, make(), y=y, cfg_scale=2.0)
  assert nfe.tolist() == [ref_nfe] * B
  assert ref_nfe < RULE_STEPS
  np.testing.assert_allclose(np.asarray(x0).reshape(B, -1), ref, rtol=1e-4, atol=1e-4)


def _teacache_loop(net, x, grid, threshold, margins=None, accumulated=None):
  """TeaCache with per-branch accumulators as a Python loop over the network's pieces (d itself as
  the rescaling): each branch's blocks run on its own rows when it computes. margins gets
  |acc - threshold| / threshold of every decision, accumulated the accumulators [2] after each
  unforced step. Returns (x0, nfe, the number of steps at which one branch computed alone)."""
  embed, signal, blocks, head = (jax.jit(f) for f in (net.embed, net.signal, net.blocks, net.head))
  n, acc, nfe, alone = len(grid) - 1, np.zeros(2), 0.0, 0
  m_prev = residual = None
  for i in range(n):
    t, s = grid[i], grid[i + 1]
    h, c = embed(x, jnp.full(B, t, jnp.float32))
    m = np.asarray(signal(h, c), np.float64).reshape(2, -1)
    compute = [True, True]
    if 0 < i < n - 1:
      for k in range(2):
        acc[k] += np.mean(np.abs(m[k] - m_prev[k])) / np.mean(np.abs(m_prev[k]))
        if margins is not None:
          margins.append(abs(acc[k] / threshold - 1))
        compute[k] = bool(acc[k] >= threshold)
      if accumulated is not None:
        accumulated.append(acc.copy())
    acc[compute] = 0.0
    m_prev = m
    rows = lambda a, k: a[k * B:(k + 1) * B]
    h_used, new_residual = [], []
    for k in range(2):
      if compute[k]:
        out = blocks(rows(h, k), rows(c, k))
        new_residual.append(out - rows(h, k))
        h_used.append(out)
      else:
        new_residual.append(rows(residual, k))
        h_used.append(rows(h, k) + rows(residual, k))
    residual = jnp.concatenate(new_residual)
    nfe += sum(compute) / 2
    alone += sum(compute) == 1
    x = sampling.euler_step(net, x, t, s, head(jnp.concatenate(h_used), c))
  return x, nfe, alone


def _splitting_thresholds(accumulated):
  """Thresholds at which one branch computes alone at its first computation, widest margin first.

  accumulated: the accumulators [2] after each unforced step of a run that never computes. A
  threshold in (max(min_k A_k(i), max_k A_k(i - 1)), max_k A_k(i)) is first reached at step i, by
  one branch only (the trajectory up to there is that run's); the geometric midpoint of the widest
  such interval keeps the decisions farthest from a tie."""
  candidates, reached = [], 0.0
  for a in accumulated:
    lo, hi = max(a.min(), reached), a.max()
    if hi > lo > 0:
      candidates.append((np.log(hi / lo), float(np.sqrt(lo * hi))))
    reached = hi
  return [threshold for _, threshold in sorted(candidates, reverse=True)]


def test_teacache_decides_per_branch_and_computes_one_branch_alone(setup, rng):
  """The conditional and unconditional branches keep their own accumulators (their signals differ
  through the label in the modulation, by 0.5-20% at a step), so at a threshold between their
  accumulations only one branch computes at a step. There the sampler matches the per-branch loop,
  and the blocks see the B rows of one branch (counted: rows / (2 B) = NFE). A draw whose widest
  splits all come within TIE_MARGIN of a tie later in the run gets new weights."""
  model, params, x, t, y = setup
  grid = np.asarray(flow.time_grid(STEPS))
  for _ in range(5):
    net = sampling.dit_network(model, params, (H, W, C), y=y, cfg_scale=2.0)
    accumulated = []
    _teacache_loop(net, x, grid, np.inf, accumulated=accumulated)
    for threshold in _splitting_thresholds(accumulated)[:3]:
      margins = []
      ref, ref_nfe, alone = _teacache_loop(net, x, grid, threshold, margins)
      if min(margins) >= TIE_MARGIN:
        break
    else:
      params = random_params(model, rng, x, t, y)
      continue
    break
  else:
    raise AssertionError("no splitting threshold without a near-tie in 5 draws of weights")
  assert alone >= 1
  rows = []

  def blocks(h, c):
    jax.debug.callback(lambda h: rows.append(h.shape[0]), h)
    return net.blocks(h, c)

  x0, nfe = jax.jit(lambda x: sampling.sample_network(
      net._replace(blocks=blocks), x, STEPS, sampling.teacache(threshold)))(x)
  assert float(nfe) == ref_nfe
  assert sum(rows) / (2 * B) == ref_nfe and rows.count(B) == alone
  # Both in float32, but the blocks on B rows (the loop) and on 2 B rows (the sampler) round
  # differently, and the random DiT amplifies that: in the one draw of 100 that failed an atol of
  # 1e-4, the samples differed by 5e-5 of their largest entry (3e-5 with every step computed).
  np.testing.assert_allclose(x0, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
