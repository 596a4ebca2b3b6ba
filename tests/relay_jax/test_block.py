"""relay_jax.block: the block-causal training layout and the exactness of the KV cache."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from relay_jax import block, objectives
from relay_jax.model import RelayTransformer

MASK = 256
NB, BS = 4, 8


def _model(**kw):
  return RelayTransformer(vocab_size=257, mask_id=MASK, width=32, depth=2, num_heads=2, mlp_dim=64,
                          relay_positions="masked", **kw)


def test_training_mask_matches_definition():
  m = np.asarray(block.training_mask(3, 2))
  n = 6
  for i in range(2 * n):
    for j in range(2 * n):
      bi, bj = (i % n) // 2, (j % n) // 2
      if i < n:     # noisy query: its own noisy block, earlier clean blocks
        want = (bi == bj) if j < n else (bj < bi)
      else:         # clean query: clean blocks up to its own
        want = (j >= n) and (bj <= bi)
      assert m[i, j] == want, (i, j)


def test_noisy_block_sees_only_earlier_clean_blocks():
  key = jax.random.key(np.random.default_rng().integers(1 << 30))
  m = _model()
  x0 = jax.random.randint(key, (2, NB * BS), 0, 256)
  x_t = jnp.where(jax.random.uniform(jax.random.fold_in(key, 1), x0.shape) < 0.5, MASK, x0)
  params = m.init(key, jnp.concatenate([x0, x0], 1))["params"]
  apply = block.make_train_apply(m, NB, BS)
  logits, _ = apply(params, x_t, None, None, x0)
  changed = x0.at[:, 2 * BS:3 * BS].set((x0[:, 2 * BS:3 * BS] + 1) % 256)   # clean block 2
  logits2, _ = apply(params, x_t, None, None, changed)
  diff = np.abs(np.asarray(logits - logits2))[..., :256].max(axis=(0, 2)).reshape(NB, BS).max(1)
  assert (diff[:3] == 0).all() and diff[3] > 1e-4, diff      # only block 3 sees clean block 2
  loss, _ = objectives.mlm_loss(apply, params, x0, jnp.ones_like(x0, bool), MASK, key, block_size=BS)
  assert np.isfinite(float(loss))


@pytest.mark.parametrize("use_relay", [False, True])
@pytest.mark.parametrize("teacher_forced", [False, True])
def test_kv_cache_is_exact(use_relay, teacher_forced):
  """Cached and uncached sampling give the same tokens and NFE, after a one-block prompt.

  The model runs in float64: a random model's confidences over an all-MASK block differ only slightly
  from position to position, and float32 rounding differences between two equally exact computations
  (different reduction lengths) could reorder them; in float64 they cannot at these gaps.
  """
  with jax.enable_x64(True):
    key = jax.random.key(np.random.default_rng().integers(1 << 30))
    m = _model(dtype=jnp.float64)
    x0 = jax.random.randint(key, (3, NB * BS), 0, 256)
    params = m.init(key, jnp.concatenate([x0, x0], 1))["params"]
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    run = lambda cache: jax.jit(lambda p: block.sample_blocks(
        m, p, 3, NB, BS, tau=0.999, use_relay=use_relay, cache=cache, context_BxL=x0,
        prompt_blocks=1, teacher_forced=teacher_forced, max_rounds=3))(params)
    (tok_c, nfe_c), (tok_u, nfe_u) = run(True), run(False)
  np.testing.assert_array_equal(np.asarray(tok_c), np.asarray(tok_u))
  np.testing.assert_array_equal(np.asarray(nfe_c), np.asarray(nfe_u))
  assert (np.asarray(tok_c) != MASK).all()
  np.testing.assert_array_equal(np.asarray(tok_c)[:, :BS], np.asarray(x0)[:, :BS])   # the prompt
  assert (np.asarray(nfe_c) > NB - 1).all()             # some block took more than one round
