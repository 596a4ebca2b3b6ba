"""relay_jax.unmask (against slow loops) and relay_jax.sample.unmask_loop (against a Python loop)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relay_jax import sample, unmask


def select_cumulative_loop(conf, masked, tau):
  out = np.zeros(masked.shape, bool)
  for i in range(masked.shape[0]):
    cells = [j for j in range(masked.shape[1]) if masked[i, j]]
    cells.sort(key=lambda j: 1 - conf[i, j])           # stable: ties keep position order
    total = 0.0
    for n, j in enumerate(cells):
      total += 1 - conf[i, j]
      if n > 0 and total >= tau[i]:
        break
      out[i, j] = True
  return out


def select_threshold_loop(conf, masked, tau, block):
  out = masked & (conf > tau[:, None])
  for i in range(masked.shape[0]):
    for start in range(0, masked.shape[1], block):
      cells = [j for j in range(start, start + block) if masked[i, j]]
      if cells:
        out[i, max(cells, key=lambda j: (conf[i, j], -j))] = True
  return out


def _budgets_clear_of_sums(rng, conf, masked, low_B, high, margin=1e-4):
  """Budgets tau_B ~ U(low_B, high) at least `margin` from every prefix sum of the row's sorted
  uncertainties 1 - conf. The loop and `select_cumulative` add the same float32 values in different
  orders; on sums below 1 their results differ by < 81 * 2^-24 ~ 5e-6, so only a budget this close
  to a sum could be read differently by the two."""
  sums_BxL = np.cumsum(np.sort(np.where(masked, 1.0 - conf.astype(np.float64), np.inf), 1), 1)
  tau_B = np.empty(len(conf), np.float32)
  for i in range(len(conf)):
    tau_B[i] = rng.uniform(low_B[i], high)
    while np.abs(sums_BxL[i] - tau_B[i]).min() < margin:     # rare: redraw
      tau_B[i] = rng.uniform(low_B[i], high)
  return tau_B


@pytest.mark.parametrize("cells", [81, 36, 16])          # 9x9, 6x6 and 4x4 grids
def test_select_cumulative_matches_loop(cells, rng):
  conf = rng.uniform(size=(16, cells)).astype(np.float32)
  conf[:, ::7] = conf[:, 3:4]                           # ties
  conf[0] = 0.999                                        # a confident row reveals many cells
  masked = rng.uniform(size=(16, cells)) < rng.uniform(size=(16, 1))
  masked[0, rng.choice(cells, 2, replace=False)] = True  # ... at least two
  masked[1] = False                                      # a finished row reveals nothing
  # Row 0's budget (>= 0.01) takes several of its uncertainties (0.001 each).
  tau = _budgets_clear_of_sums(rng, conf, masked, np.r_[0.01, np.zeros(15)], 0.5)
  got = np.asarray(unmask.select_cumulative(jnp.asarray(conf), jnp.asarray(masked), jnp.asarray(tau)))
  np.testing.assert_array_equal(got, select_cumulative_loop(conf, masked, tau))
  assert not got[1].any() and got[0].sum() > 1
  assert (got.sum(1) >= masked.any(1)).all()


@pytest.mark.parametrize("block", [81, 27, 9])
def test_select_threshold_matches_loop(block, rng):
  conf = rng.uniform(size=(8, 81)).astype(np.float32)
  masked = rng.uniform(size=(8, 81)) < 0.5
  tau = np.full(8, 0.85, np.float32)
  got = unmask.select_threshold(jnp.asarray(conf), jnp.asarray(masked), 0.85, block_size=block)
  np.testing.assert_array_equal(np.asarray(got), select_threshold_loop(conf, masked, tau, block))


def _toy_params(rng, vocab=10, width=8):
  return {"emb": jnp.asarray(rng.normal(size=(vocab, width)), jnp.float32),
          "out": jnp.asarray(rng.normal(size=(width, vocab)), jnp.float32),
          "scale": jnp.float32(3.0)}


def _toy_apply(params, x, h, key, clean):
  """A deterministic stand-in model whose predictions depend on x and h (so relay matters).

  Every masked cell of a row sees the same input (MASK, and the same h: the state of a cell that
  was masked in every earlier round) and so gets the same prediction: ties within a row are exact
  and broken by position in any implementation.
  """
  feats = params["emb"][x] + (0.0 if h is None else 0.5 * jnp.tanh(h))
  feats = feats + feats.mean(axis=1, keepdims=True)   # mixes positions, like attention
  logits = (feats @ params["out"]) * params["scale"]
  return logits.at[..., 0].set(-jnp.inf), feats


# Jitted once per static setting, not per draw: every draw runs the same compiled programs (a
# fresh program per call would also pile up executables over `--seeds` runs).
_unmask_loop = jax.jit(functools.partial(sample.unmask_loop, _toy_apply),
                       static_argnames=("mask_id", "width", "max_rounds", "use_relay",
                                        "return_trajectory"))


def _clear_of_ties(logits, conf, masked, tau_B, last_round):
  """Whether this round's decisions are far from ties. Two float32 evaluations of the same model
  (the jitted loop fuses what the Python loop runs op by op) can differ by rounding: a few ulps of a
  logit (< 1e-4 at the |logit| < ~100 seen here), which moves u = 1 - conf by < 2e-4 u (|du| <=
  2 u max |d logit|), plus a few ulps of conf; so a sum of up to 81 uncertainties near tau moves by
  < 5e-5. The margins are ten times that or more: a 1e-2 logit gap between the two best tokens,
  and a budget 3e-3 * tau away from every sum of the row's sorted uncertainties."""
  top2 = np.sort(logits[masked], axis=-1)[:, -2:]
  if (top2[:, 1] - top2[:, 0] < 1e-2).any():
    return False
  if last_round:
    return True
  for i in np.flatnonzero(masked.any(1) & (tau_B > 0)):    # tau = 0 reveals one cell whatever u is
    sums = np.cumsum(np.sort(1.0 - conf[i][masked[i]].astype(np.float64)))
    if np.abs(sums - tau_B[i]).min() < 3e-3 * tau_B[i]:
      return False
  return True


def unmask_loop_python(apply, params, x, *, tau, width, max_rounds, use_relay):
  """(tokens, nfe, whether every round's decisions were clear of ties)."""
  x = np.array(x)
  h = np.zeros(x.shape + (width,), np.float32)
  nfe = np.zeros(x.shape[0], int)
  clear = True
  for r in range(max_rounds):
    masked = x == 0
    if not masked.any():
      break
    logits, h_new = apply(params, jnp.asarray(x), jnp.asarray(h) if use_relay else None, None, None)
    conf, pred = (np.asarray(a) for a in unmask.confidence(logits))
    clear = clear and _clear_of_ties(np.asarray(logits), conf, masked, np.asarray(tau),
                                     r == max_rounds - 1)
    reveal = masked if r == max_rounds - 1 else np.asarray(
        unmask.select_cumulative(jnp.asarray(conf), jnp.asarray(masked), jnp.asarray(tau)))
    active = masked.any(1)
    x = np.where(reveal, pred, x)
    h = np.where(active[:, None, None], np.asarray(h_new), h)
    nfe += active
  return x, nfe, clear


@pytest.mark.parametrize("use_relay, max_rounds, n", [(True, 64, 9), (False, 64, 9), (True, 5, 9),
                                                      (False, 5, 9), (True, 64, 6), (False, 5, 4)])
def test_unmask_loop_matches_python_loop(use_relay, max_rounds, n, rng):
  # Row 0 has one masked cell (done after one round); row 1 has tau = 0 (one cell per round) and at
  # least two: rows stop at different rounds. A draw whose decisions come near a tie (rare) is
  # redrawn, so that both loops must take the same decisions.
  tau_B = np.full(6, 0.15, np.float32)
  tau_B[1] = 0.0
  for _ in range(100):
    params = _toy_params(rng, vocab=n + 1)          # MASK and the digits 1..n of an n x n grid
    clues = rng.integers(1, n + 1, size=(6, n * n))
    masked = rng.uniform(size=(6, n * n)) < rng.uniform(0.1, 0.9, size=(6, 1))
    masked[0] = np.arange(n * n) == rng.integers(n * n)
    masked[1, rng.choice(n * n, 2, replace=False)] = True
    x = np.where(masked, 0, clues)
    want_x, want_nfe, clear = unmask_loop_python(_toy_apply, params, x, tau=tau_B, width=8,
                                                 max_rounds=max_rounds, use_relay=use_relay)
    if clear:
      break
  assert clear, "no draw clear of ties in 100"
  got_x, got_nfe = _unmask_loop(params, jnp.asarray(x), mask_id=0, width=8, tau=jnp.asarray(tau_B),
                                max_rounds=max_rounds, use_relay=use_relay)
  np.testing.assert_array_equal(np.asarray(got_x), want_x)
  np.testing.assert_array_equal(np.asarray(got_nfe), want_nfe)
  assert (np.asarray(got_x) != 0).all()                          # the cap reveals everything
  np.testing.assert_array_equal(np.asarray(got_x)[~masked], clues[~masked])   # clues are fixed
  assert want_nfe[0] == 1 and want_nfe[1] > 1                    # rows stop at different rounds
  _, nfe_t, traj = _unmask_loop(params, jnp.asarray(x), mask_id=0, width=8, tau=jnp.asarray(tau_B),
                                max_rounds=max_rounds, use_relay=use_relay, return_trajectory=True)
  np.testing.assert_array_equal(np.asarray(traj[-1]), want_x)
  np.testing.assert_array_equal(np.asarray(nfe_t), want_nfe)
