"""relay_jax.block: the block-causal training layout and the exactness of the KV cache."""
import functools

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


# Programs compiled once and shared by the tests and their draws, which come in as arguments:
# compiling the initialisers' PRNG ops, eagerly once per parameter shape, dominated these tests, and
# a program per call would also pile up executables over `--seeds` runs. Parameters are float32
# (flax's default param_dtype) whatever the compute dtype.
_init = jax.jit(lambda key: _model().init(key, jnp.zeros((1, 2 * NB * BS), jnp.int32))["params"])
_train_apply = jax.jit(block.make_train_apply(_model(), NB, BS))
_mlm_loss = jax.jit(lambda p, x0, key: objectives.mlm_loss(
    block.make_train_apply(_model(), NB, BS), p, x0, jnp.ones_like(x0, bool), MASK,
    jax.random.fold_in(key, 1), block_size=BS))     # another key than the parameters'


@functools.cache
def _sampler(use_relay, teacher_forced, cache):
  """Jitted (float64 params, context) -> (tokens, nfe) of a float64 model."""
  m = _model(dtype=jnp.float64)
  return jax.jit(lambda p, ctx: block.sample_blocks(
      m, p, 3, NB, BS, tau=0.999, use_relay=use_relay, cache=cache, context_BxL=ctx,
      prompt_blocks=1, teacher_forced=teacher_forced, max_rounds=3))


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


def test_noisy_block_sees_only_earlier_clean_blocks(key, rng):
  x0 = rng.integers(0, 256, (2, NB * BS)).astype(np.int32)
  x_t = np.where(rng.uniform(size=x0.shape) < 0.5, MASK, x0)
  params = _init(key)
  logits, _ = _train_apply(params, x_t, None, None, x0)
  changed = x0.copy()
  changed[:, 2 * BS:3 * BS] = (changed[:, 2 * BS:3 * BS] + 1) % 256   # clean block 2
  logits2, _ = _train_apply(params, x_t, None, None, changed)
  diff = np.abs(np.asarray(logits - logits2))[..., :256].max(axis=(0, 2)).reshape(NB, BS).max(1)
  assert (diff[:3] == 0).all() and diff[3] > 1e-4, diff      # only block 3 sees clean block 2
  loss, _ = _mlm_loss(params, x0, key)
  assert np.isfinite(float(loss))


@pytest.mark.parametrize("use_relay", [False, True])
@pytest.mark.parametrize("teacher_forced", [False, True])
def test_kv_cache_is_exact(use_relay, teacher_forced, key, rng):
  """Cached and uncached sampling give the same tokens and NFE, after a one-block prompt.

  The model runs in float64: a random model's confidences over an all-MASK block differ only slightly
  from position to position, and float32 rounding differences between two equally exact computations
  (different reduction lengths) could reorder them; in float64 they cannot at these gaps.
  No position ever reaches tau = 0.999 (a random model's confidence over 256 tokens stays near
  1/256), so each round reveals the block's most confident position and the third round the rest:
  3 rounds per generated block, every reveal an argmax, decided far from a tie in float64.
  """
  x0 = rng.integers(0, 256, (3, NB * BS)).astype(np.int32)
  params = _init(key)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    run = lambda cache: _sampler(use_relay, teacher_forced, cache)(params, jnp.asarray(x0))
    (tok_c, nfe_c), (tok_u, nfe_u) = run(True), run(False)
  np.testing.assert_array_equal(np.asarray(tok_c), np.asarray(tok_u))
  np.testing.assert_array_equal(np.asarray(nfe_c), np.asarray(nfe_u))
  assert (np.asarray(tok_c) != MASK).all()
  np.testing.assert_array_equal(np.asarray(tok_c)[:, :BS], x0[:, :BS])   # the prompt
  assert (np.asarray(nfe_c) > NB - 1).all()             # some block took more than one round
