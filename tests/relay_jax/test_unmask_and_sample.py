"""relay_jax.unmask (against slow loops) and relay_jax.sample.unmask_loop (against a Python loop)."""
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


@pytest.mark.parametrize("seed", range(3))
def test_select_cumulative_matches_loop(seed):
  rng = np.random.default_rng(seed)
  conf = rng.uniform(size=(16, 81)).astype(np.float32)
  conf[:, ::7] = conf[:, 3:4]                           # ties
  conf[0] = 0.999                                        # a confident row reveals many cells
  masked = rng.uniform(size=(16, 81)) < rng.uniform(size=(16, 1))
  masked[1] = False                                      # a finished row reveals nothing
  tau = rng.uniform(0.0, 0.5, size=16).astype(np.float32)
  got = np.asarray(unmask.select_cumulative(jnp.asarray(conf), jnp.asarray(masked), jnp.asarray(tau)))
  np.testing.assert_array_equal(got, select_cumulative_loop(conf, masked, tau))
  assert not got[1].any() and got[0].sum() > 1
  assert (got.sum(1) >= masked.any(1)).all()


@pytest.mark.parametrize("block", [81, 27, 9])
def test_select_threshold_matches_loop(block):
  rng = np.random.default_rng(block)
  conf = rng.uniform(size=(8, 81)).astype(np.float32)
  masked = rng.uniform(size=(8, 81)) < 0.5
  tau = np.full(8, 0.85, np.float32)
  got = unmask.select_threshold(jnp.asarray(conf), jnp.asarray(masked), 0.85, block_size=block)
  np.testing.assert_array_equal(np.asarray(got), select_threshold_loop(conf, masked, tau, block))


def _toy_apply(vocab=10, width=8, seed=0):
  """A deterministic stand-in model whose predictions depend on x and h (so relay matters)."""
  rng = np.random.default_rng(seed)
  emb = jnp.asarray(rng.normal(size=(vocab, width)), jnp.float32)
  out = jnp.asarray(rng.normal(size=(width, vocab)), jnp.float32)

  def apply(params, x, h, key, clean):
    feats = emb[x] + (0.0 if h is None else 0.5 * jnp.tanh(h))
    feats = feats + feats.mean(axis=1, keepdims=True)   # mixes positions, like attention
    logits = (feats @ out) * params
    return logits.at[..., 0].set(-jnp.inf), feats
  return apply


def unmask_loop_python(apply, params, x, *, tau, width, max_rounds, use_relay):
  x = np.array(x)
  h = np.zeros(x.shape + (width,), np.float32)
  nfe = np.zeros(x.shape[0], int)
  for r in range(max_rounds):
    masked = x == 0
    if not masked.any():
      break
    logits, h_new = apply(params, jnp.asarray(x), jnp.asarray(h) if use_relay else None, None, None)
    conf, pred = (np.asarray(a) for a in unmask.confidence(logits))
    reveal = masked if r == max_rounds - 1 else np.asarray(
        unmask.select_cumulative(jnp.asarray(conf), jnp.asarray(masked), tau))
    active = masked.any(1)
    x = np.where(reveal, pred, x)
    h = np.where(active[:, None, None], np.asarray(h_new), h)
    nfe += active
  return x, nfe


@pytest.mark.parametrize("use_relay", [True, False])
@pytest.mark.parametrize("max_rounds", [64, 5])
def test_unmask_loop_matches_python_loop(use_relay, max_rounds):
  rng = np.random.default_rng(max_rounds)
  apply = _toy_apply()
  clues = rng.integers(1, 10, size=(6, 81))
  masked = rng.uniform(size=(6, 81)) < rng.uniform(0.1, 0.9, size=(6, 1))
  x = np.where(masked, 0, clues)
  got_x, got_nfe = sample.unmask_loop(apply, 3.0, jnp.asarray(x), mask_id=0, width=8, tau=0.15,
                                      max_rounds=max_rounds, use_relay=use_relay)
  want_x, want_nfe = unmask_loop_python(apply, 3.0, x, tau=0.15, width=8, max_rounds=max_rounds,
                                        use_relay=use_relay)
  np.testing.assert_array_equal(np.asarray(got_x), want_x)
  np.testing.assert_array_equal(np.asarray(got_nfe), want_nfe)
  assert (np.asarray(got_x) != 0).all()                          # the cap reveals everything
  np.testing.assert_array_equal(np.asarray(got_x)[~masked], clues[~masked])   # clues are fixed
  assert len(set(want_nfe)) > 1 or max_rounds == 5               # rows stop at different rounds
  _, nfe_t, traj = sample.unmask_loop(apply, 3.0, jnp.asarray(x), mask_id=0, width=8, tau=0.15,
                                      max_rounds=max_rounds, use_relay=use_relay,
                                      return_trajectory=True)
  np.testing.assert_array_equal(np.asarray(traj[-1]), want_x)
  np.testing.assert_array_equal(np.asarray(nfe_t), want_nfe)
