"""relay_jax.model (the relay channel, SUBS logits, KV prefix) and relay_jax.objectives (MDLM
masking and weights against closed forms, the unweighted loss against a slow reference, tau jitter,
buffer refill, which gradients cross relay edges)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relay_jax import objectives, unmask
from relay_jax.model import RelayTransformer

MASK = 0


def _model(**kw):
  kw = {"vocab_size": 10, "mask_id": MASK, "width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64,
        **kw}
  return RelayTransformer(**kw)


def _tokens(rng, b=3, length=20, p_mask=0.5):
  """Digits with about p_mask of them MASK; in every row position 0 is masked and position 1 is
  not, so the tests below always have both kinds of position."""
  x = np.where(rng.uniform(size=(b, length)) < p_mask, MASK, rng.integers(1, 10, (b, length)))
  x[:, 0], x[:, 1] = MASK, rng.integers(1, 10, b)
  return jnp.asarray(x, jnp.int32)


def test_relay_channel_variants(key, rng):
  x = _tokens(rng)
  h = jnp.asarray(rng.normal(size=x.shape + (32,)), jnp.float32)
  h2 = h + jnp.asarray(rng.normal(size=h.shape), jnp.float32)
  # Zero-initialised scale: an exact no-op at initialisation.
  m = _model(relay_zero_init=True)
  p = m.init(key, x)["params"]
  np.testing.assert_array_equal(m.apply({"params": p}, x, h)[0], m.apply({"params": p}, x, None)[0])
  # Default init: h matters; "masked" ignores h at revealed positions only.
  m = _model(relay_positions="masked")
  p = m.init(key, x)["params"]
  logits_h = m.apply({"params": p}, x, h)[0]
  assert np.abs(np.asarray(logits_h - m.apply({"params": p}, x, None)[0]))[..., 1:].max() > 1e-3
  h_revealed_changed = jnp.where((x == MASK)[..., None], h, h2)
  np.testing.assert_allclose(m.apply({"params": p}, x, h_revealed_changed)[0], logits_h, atol=1e-6)
  h_masked_changed = jnp.where((x == MASK)[..., None], h2, h)
  assert np.abs(np.asarray(m.apply({"params": p}, x, h_masked_changed)[0] - logits_h))[..., 1:].max() > 1e-3
  assert np.isneginf(np.asarray(logits_h[..., MASK])).all()     # SUBS: MASK is never predicted
  # Without the channel there is no relay parameter and h is ignored.
  m = _model(relay=False)
  p = m.init(key, x)["params"]
  assert "relay_norm" not in p
  np.testing.assert_array_equal(m.apply({"params": p}, x, h)[0], m.apply({"params": p}, x, None)[0])


def test_relayed_layer_is_configurable(key, rng):
  x = _tokens(rng)
  p = _model().init(key, x)["params"]
  h_last = _model(relay_layer=-1).apply({"params": p}, x)[1]
  h_first = _model(relay_layer=0).apply({"params": p}, x)[1]
  assert h_last.shape == h_first.shape == x.shape + (32,)
  assert np.abs(np.asarray(h_last - h_first)).max() > 1e-3


@jax.jit
def _full_and_cached(key, x_BxL):
  """A fresh model's logits of a 24-token sequence under a block-causal mask (prefix 0..15 never
  sees 16..23), and of its last 8 tokens run alone against the prefix's cached keys and values."""
  m, n = _model(relay=False), jnp.arange(24)
  p = {"params": m.init(key, x_BxL)["params"]}
  full = m.apply(p, x_BxL, mask=(n[None, :] < 16) | (n[:, None] >= 16))[0]
  _, _, cache = m.apply(p, x_BxL[:, :16], return_kv=True)
  return full, m.apply(p, x_BxL[:, 16:], positions_L=n[16:], kv_cache=cache)[0]


def test_kv_prefix_equals_attending_to_the_concatenation(key, rng):
  """Tokens attending to a cached prefix == the same tokens at the end of the full sequence when the
  prefix cannot see them (block-causal mask)."""
  full, tail = _full_and_cached(key, _tokens(rng, length=24))   # one program: faster than op by op
  np.testing.assert_allclose(tail, full[:, 16:], rtol=1e-5, atol=1e-5)


def test_mdlm_mask_rate_and_loss_weight(key):
  """P(masked | t) = t on maskable positions only; with uniform predictions over V' tokens the
  1/t-weighted loss has expectation log V' (MDLM's ELBO of a uniform model).

  False alarms (bounds for this b, L and 60% maskable): given t, the fitted slope and intercept are
  sums of independent bounded terms (standard errors ~0.0012 and ~0.0008), and Bernstein's
  inequality puts a deviation of 0.02 below 1e-50. The loss is heavy-tailed: a row's masked count
  is weighted by 1/t, up to 1 / t_min = 1000. Chernoff's bound, computed numerically for loss /
  log V' = mean_b k_b / (t_b m_b) with t_b ~ U(1e-3, 1), m_b ~ Bin(81, 0.6), k_b ~ Bin(m_b, t_b),
  puts P(rtol 0.03 exceeded) below 2e-12 at b = 16384 (but only below 1e-3 at b = 4096). A wrong
  weight or normalisation is off by 40% or more.
  """
  k_maskable, k_mask, k_x0, k_loss = jax.random.split(key, 4)
  b, length = 16384, 81
  maskable = jax.random.uniform(k_maskable, (b, length)) < 0.6
  t, masked = objectives.mdlm_mask(k_mask, maskable)
  assert not (masked & ~maskable).any()
  frac = masked.sum(1) / maskable.sum(1)
  slope = np.polyfit(np.asarray(t[:, 0]), np.asarray(frac), 1)
  assert (t == t[:, :1]).all()                                  # one t per example
  np.testing.assert_allclose(slope, [1.0, 0.0], atol=0.02)
  uniform = lambda params, x, h, k, clean: (jnp.zeros(x.shape + (10,)).at[..., MASK].set(-jnp.inf), None)
  x0 = jax.random.randint(k_x0, (b, length), 1, 10)
  loss, _ = objectives.mlm_loss(uniform, None, x0, maskable, MASK, k_loss,
                                weighting="mdlm")
  np.testing.assert_allclose(float(loss), np.log(9.0), rtol=0.03)


def test_unweighted_mlm_loss_is_the_pooled_mean_over_masked_tokens(key, rng):
  """The authors' loss against float64 numpy: sum of CE over every masked token of the batch / their
  count (rows with few or many masked tokens weigh by their count: a per-row mean, or a 1/t
  weight, gives another value). The apply records the state it sees, naming the masked cells."""
  b, length = 8, 30
  emb, pos = rng.normal(size=(10, 10)), rng.normal(size=(length, 10))
  seen = []

  def apply(params, x, h, k, clean):
    seen.append(np.asarray(x))
    logits = jnp.asarray(emb, jnp.float32)[x] + jnp.asarray(pos, jnp.float32)
    return logits.at[..., MASK].set(-jnp.inf), None
  x0 = rng.integers(1, 10, (b, length))
  maskable = rng.uniform(size=(b, length)) < rng.uniform(0.2, 1.0, (b, 1))
  mlm = lambda weighting: objectives.mlm_loss(apply, None, jnp.asarray(x0), jnp.asarray(maskable),
                                              MASK, key, weighting=weighting)
  loss, metrics = mlm("unweighted")
  (x_t,) = seen
  masked = x_t == MASK
  assert not (masked & ~maskable).any() and (x_t[~masked] == x0[~masked]).all()
  logits = emb[x_t] + pos
  logits[..., MASK] = -np.inf
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ce = logz - np.take_along_axis(logits, x0[..., None], -1)[..., 0]
  count = max(masked.sum(), 1)
  np.testing.assert_allclose(float(loss), (ce * masked).sum() / count, rtol=1e-5)
  right = (logits.argmax(-1) == x0) & masked
  np.testing.assert_allclose(float(metrics["masked_accuracy"]), right.sum() / count, rtol=1e-6)
  with pytest.raises(ValueError, match="weighting"):
    mlm("elbo")


# 20000 draws of both modes' budgets N(0.15, 0.1^2) for 4 rows, [20000, 2, 4], in one program.
_jitter_draws = jax.jit(lambda key: jax.vmap(lambda k: jnp.stack(
    [objectives.jitter_tau(k, 0.15, 0.1, 4, mode) for mode in objectives.TAU_JITTERS]))(
        jax.random.split(key, 20000)))


def test_tau_jitter_one_draw_per_round_for_the_batch_or_per_row(key, rng):
  """jitter_tau draws N(0.15, 0.1^2) clipped at 0: shared by the rows ("batch") or independent per
  row ("row"), against the clipped normal's closed forms: P(0) = Phi(-1.5) and mean
  mu Phi(mu / s) + s phi(mu / s). Bounds: over 20000 batch draws the zero fraction's and the mean's
  standard errors are 0.0018 and 0.0007 (0.0009 and 0.0003 over the 80000 row draws), so the
  tolerances 0.01 and 0.004 are >= 5.5 standard errors; the correlation of two rows (standard error
  0.007) is allowed 0.05. rollout_loss hands each round's draw to its select rule."""
  mu, s = 0.15, 0.1
  p_zero = 0.5 * (1 + math.erf(-mu / s / math.sqrt(2)))
  mean = mu * (1 - p_zero) + s * math.exp(-0.5 * (mu / s) ** 2) / math.sqrt(2 * math.pi)
  draws_Nx2xB = np.asarray(_jitter_draws(key))
  for row in (False, True):
    tau_NxB = draws_Nx2xB[:, objectives.TAU_JITTERS.index("row" if row else "batch")]
    assert tau_NxB.shape == (20000, 4) and (tau_NxB >= 0).all()
    if row:
      assert abs(np.corrcoef(tau_NxB[:, 0], tau_NxB[:, 1])[0, 1]) < 0.05
    else:
      np.testing.assert_array_equal(tau_NxB, tau_NxB[:, :1].repeat(4, 1))
    np.testing.assert_allclose((tau_NxB == 0).mean(), p_zero, atol=0.01)
    np.testing.assert_allclose(tau_NxB.mean(), mean, atol=0.004)
  with pytest.raises(ValueError, match="tau_jitter"):
    objectives.jitter_tau(key, mu, s, 4, "step")

  apply, params, calls = _probed_apply(rng)
  x0 = jnp.asarray(rng.integers(1, 10, size=(4, 12)))
  maskable = jnp.asarray(rng.uniform(size=(4, 12)) < 0.8).at[:, :2].set(True)
  for mode in objectives.TAU_JITTERS:
    budgets = []

    def select(conf, masked, tau_B):
      budgets.append(np.asarray(tau_B))
      return unmask.select_cumulative(conf, masked, tau_B)
    calls.clear()
    # tau = 0.5 with s = 0.2: a clipped draw (which two rows could share) has probability 0.6%.
    objectives.rollout_loss(apply, params, objectives.init_buffer(4, 12, 8), x0, maskable,
                            objective="relay", mask_id=MASK, rounds=2, tau=0.5, tau_std=0.2,
                            key=key, select=select, tau_jitter=mode)
    assert len(budgets) == 2
    for tau_B in budgets:
      assert (len(set(tau_B.tolist())) == 1) == (mode == "batch"), (mode, tau_B)


def test_refill_replaces_only_finished_rows(rng):
  buf = objectives.init_buffer(4, 6, 3)
  x0 = jnp.asarray(rng.integers(1, 10, size=(4, 6)))
  maskable = jnp.asarray(rng.uniform(size=(4, 6)) < 0.5).at[:, 0].set(True)
  first = objectives.refill(buf, x0, maskable, MASK)          # an empty buffer: every row refilled
  np.testing.assert_array_equal(first["x"], jnp.where(maskable, MASK, x0))
  state = {**first, "h": jnp.ones((4, 6, 3))}
  state["x"] = state["x"].at[1].set(x0[1]).at[3].set(x0[3])   # rows 1 and 3 finished
  x0_new = jnp.asarray(rng.integers(1, 10, size=(4, 6)))
  maskable_new = jnp.asarray(rng.uniform(size=(4, 6)) < 0.5).at[:, 0].set(True)
  out = objectives.refill(state, x0_new, maskable_new, MASK)
  for i in (0, 2):   # unfinished: kept, h included
    np.testing.assert_array_equal(out["x"][i], state["x"][i])
    np.testing.assert_array_equal(out["h"][i], 1.0)
  for i in (1, 3):   # finished: fresh example, every maskable cell masked, h = 0
    np.testing.assert_array_equal(out["x"][i], jnp.where(maskable_new[i], MASK, x0_new[i]))
    np.testing.assert_array_equal(out["target"][i], x0_new[i])
    np.testing.assert_array_equal(out["h"][i], 0.0)


def _probed_apply(rng):
  """A small model whose round-k relayed state gets `probes[k]` added: d loss / d probes[k] is the
  gradient that crosses the relay edge out of round k."""
  emb = jnp.asarray(rng.normal(size=(10, 8)), jnp.float32)
  calls = []

  def apply(params, x, h, key, clean):
    k = len(calls)
    calls.append(k)
    feats = emb[x] * params["scale"] + (0.0 if h is None else jnp.tanh(h))
    feats = feats + feats.mean(axis=1, keepdims=True)
    logits = (feats @ params["out"]).at[..., MASK].set(-jnp.inf)
    return logits, feats + params["probes"][k]
  params = {"scale": jnp.float32(1.0), "out": jnp.asarray(rng.normal(size=(8, 10)), jnp.float32),
            "probes": jnp.zeros((3, 1, 1, 8))}
  return apply, params, calls


@pytest.mark.parametrize("objective", ["relay", "relay_sg", "rollout"])
def test_gradients_cross_at_most_one_relay_edge(objective, key, rng):
  apply, params, calls = _probed_apply(rng)
  x0 = jnp.asarray(rng.integers(1, 10, size=(4, 12)))
  maskable = jnp.asarray(rng.uniform(size=(4, 12)) < 0.8).at[:, :2].set(True)
  buf = objectives.init_buffer(4, 12, 8)

  def loss(p):
    calls.clear()
    # tau = 0: round 1 reveals one cell per row (a larger budget could reveal every masked cell
    # of a confident row, in every row, and leave round 2 no loss through which to see round 1).
    # Each row has at least two maskable cells, so round 2 always has masked cells.
    total, _, new = objectives.rollout_loss(apply, p, buf, x0, maskable, objective=objective,
                                            mask_id=MASK, rounds=2, tau=0.0, tau_std=0.0,
                                            key=key)
    return total, new
  grads, new = jax.grad(loss, has_aux=True)(params)
  g_round1, g_round2 = (float(jnp.abs(grads["probes"][k]).sum()) for k in (0, 1))
  # Round 1's state reaches round 2's loss only through the relay edge, and only with "relay".
  assert (g_round1 > 1e-6) == (objective == "relay"), g_round1
  assert g_round2 == 0.0          # the last round's state goes to the buffer, detached
  # The buffer's state is detached: nothing differentiates through it into the next step.
  d_buffer = jax.grad(lambda p: loss(p)[1]["h"].sum())(params)
  assert all(float(jnp.abs(g).sum()) == 0.0 for g in jax.tree.leaves(d_buffer))
  assert float(jnp.abs(grads["scale"])) > 0.0
