"""Block diffusion with the relay channel: block-causal training and block-by-block sampling with an
exact KV cache (BD3-LM, arXiv 2503.09573; Relay's LLM variant, arXiv 2605.22967).

The sequence is split into blocks of `block_size` tokens. Attention is bidirectional inside a block and
causal across blocks. Training feeds [x_t ; x0] (2L tokens, both halves at positions 0..L-1): a noisy
block sees itself and the clean blocks before it, a clean block sees the clean blocks up to itself; the
loss is on the noisy half. The relay state enters the noisy half only (the clean half gets h = 0).

Sampling generates one block at a time: rounds of the threshold rule inside the block, carrying h
(reset to 0 at each new block unless `reset_relay=False`), then one pass over the finished block that
writes its keys and values into the cache. The cache is EXACT: a finished block's keys and values
depend only on the blocks up to it, which never change again, so caching them computes what
re-running the whole prefix each round computes (`cache=False` does that; tests compare the two).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from relay_jax import sample, unmask


def training_mask(num_blocks: int, block_size: int) -> jax.Array:
  """Boolean [2L, 2L] attention mask over [x_t ; x0] (True = attend)."""
  blk = jnp.arange(num_blocks * block_size) // block_size
  same = blk[:, None] == blk[None, :]
  noisy_to_clean = blk[:, None] > blk[None, :]
  clean_to_clean = blk[:, None] >= blk[None, :]
  zeros = jnp.zeros_like(same)
  return jnp.block([[same, noisy_to_clean], [zeros, clean_to_clean]])


def make_train_apply(model, num_blocks: int, block_size: int):
  """`relay_jax.objectives.Apply` for block diffusion: runs the model on [x_t ; clean] with the
  training mask and returns the noisy half's logits and relayed state."""
  length = num_blocks * block_size
  mask = training_mask(num_blocks, block_size)
  positions = jnp.concatenate([jnp.arange(length)] * 2)

  def apply(params, x_BxL, h_BxLxD, key, clean_BxL):
    tokens = jnp.concatenate([x_BxL, clean_BxL], axis=1)
    h = None if h_BxLxD is None else jnp.concatenate([h_BxLxD, jnp.zeros_like(h_BxLxD)], axis=1)
    rngs = None if key is None else {"dropout": key}
    logits, relayed = model.apply({"params": params}, tokens, h, positions_L=positions, mask=mask,
                                  deterministic=key is None, rngs=rngs)
    return logits[:, :length], relayed[:, :length]
  return apply


def _prefix_mask(block: jax.Array, block_size: int, cache_len: int) -> jax.Array:
  """[1, 1, bs, cache_len + bs]: a block's tokens see the cached blocks before `block` and
  themselves."""
  valid = jnp.arange(cache_len) < block * block_size
  row = jnp.concatenate([valid, jnp.ones((block_size,), bool)])
  return jnp.broadcast_to(row, (1, 1, block_size, cache_len + block_size))


def _uncached_mask(block: jax.Array, num_blocks: int, block_size: int) -> jax.Array:
  """[1, 1, L + bs, L + bs] over [clean sequence ; noisy block]: the clean blocks block-causally, the
  noisy block the clean blocks before `block` and itself. Clean rows at or after `block` compute
  values nothing reads."""
  length = num_blocks * block_size
  blk = jnp.arange(length) // block_size
  clean = blk[:, None] >= blk[None, :]
  top = jnp.concatenate([clean, jnp.zeros((length, block_size), bool)], axis=1)
  bottom = _prefix_mask(block, block_size, length)[0, 0]
  return jnp.concatenate([top, bottom], axis=0)[None, None]


def sample_blocks(model, params, batch_size: int, num_blocks: int, block_size: int, *, tau: float,
                  use_relay: bool, reset_relay: bool = True, cache: bool = True,
                  context_BxL: jax.Array | None = None, prompt_blocks: int = 0,
                  teacher_forced: bool = False, max_rounds: int | None = None):
  """Generates blocks left to right with the threshold rule.

  Args:
    model: a `RelayTransformer` (its mask_id is the MASK token). params: its parameters.
    tau: reveal every masked position with confidence > tau (and the most confident one).
    use_relay: carry h between rounds. reset_relay: h = 0 at each new block (else the previous
      block's last h, position by position).
    cache: use the KV cache (else recompute the clean prefix every round).
    context_BxL: known tokens: the prompt, and the ground truth for teacher-forced evaluation.
    prompt_blocks: the first blocks are the prompt, copied from context_BxL, not generated. Without a
      prompt every position of the first block sees the same all-MASK input, so the first round's
      predictions are the same at every position.
    teacher_forced: after each block, put the true block (from context_BxL) in the context instead
      of the generated one: each block is then generated given the true earlier blocks.
    max_rounds: rounds per block before everything left is revealed (default block_size).
  Returns:
    (tokens [B, L]: the prompt and the generated blocks, nfe int32 [B]: denoising rounds summed over
    the generated blocks; the one cache-filling pass per block is not counted).
  """
  if (prompt_blocks or teacher_forced) and context_BxL is None:
    raise ValueError("prompt_blocks and teacher_forced need context_BxL")
  max_rounds = max_rounds or block_size
  mask_id = model.mask_id
  length = num_blocks * block_size
  heads, head_dim = model.num_heads, model.width // model.num_heads
  run = functools.partial(model.apply, {"params": params})

  select = functools.partial(unmask.select_threshold, block_size=block_size)

  def denoise_round(state, block, tokens, kv):
    x, h = state[:2]
    positions = block * block_size + jnp.arange(block_size)
    if cache:
      logits, h_new = run(x, h if use_relay else None, positions_L=positions,
                          mask=_prefix_mask(block, block_size, length), kv_cache=kv)
    else:
      prefix = context_BxL if teacher_forced else tokens
      seq = jnp.concatenate([prefix, x], axis=1)
      h_seq = (jnp.concatenate([jnp.zeros((batch_size, length, model.width)), h], 1) if use_relay
               else None)
      logits, h_new = run(seq, h_seq, positions_L=jnp.concatenate([jnp.arange(length), positions]),
                          mask=_uncached_mask(block, num_blocks, block_size))
      logits, h_new = logits[:, length:], h_new[:, length:]
    return sample.reveal_round(state, logits, h_new, mask_id=mask_id, select=select, tau=tau,
                               max_rounds=max_rounds)

  def block_step(block, carry):
    tokens, h_prev, nfe, kv = carry
    start = block * block_size
    h0 = jnp.zeros_like(h_prev) if reset_relay else h_prev
    x0 = jnp.full((batch_size, block_size), mask_id, jnp.int32)
    if prompt_blocks:   # a prompt block starts (and so stays) complete
      known = jax.lax.dynamic_slice(context_BxL, (0, start), (batch_size, block_size))
      x0 = jnp.where(block < prompt_blocks, known.astype(jnp.int32), x0)
    x, h, nfe, _ = jax.lax.while_loop(
        lambda s: (s[3] < max_rounds) & (s[0] == mask_id).any(),
        lambda s: denoise_round(s, block, tokens, kv), (x0, h0, nfe, jnp.zeros((), jnp.int32)))
    tokens = jax.lax.dynamic_update_slice(tokens, x, (0, start))
    if cache:   # one pass over the finished block (clean, h = 0) fills its slot of the cache
      keep = (jax.lax.dynamic_slice(context_BxL, (0, start), (batch_size, block_size))
              if teacher_forced else x)
      _, _, own = run(keep, None, positions_L=start + jnp.arange(block_size),
                      mask=_prefix_mask(block, block_size, length), kv_cache=kv, return_kv=True)
      kv = [tuple(jax.lax.dynamic_update_slice(c, o, (0, start, 0, 0)) for c, o in zip(layer, new))
            for layer, new in zip(kv, own)]
    return tokens, h, nfe, kv

  tokens = jnp.full((batch_size, length), mask_id, jnp.int32)
  kv = [(jnp.zeros((batch_size, length, heads, head_dim)),) * 2 for _ in range(model.depth)]
  carry = (tokens, jnp.zeros((batch_size, block_size, model.width)),
           jnp.zeros((batch_size,), jnp.int32), kv)
  tokens, _, nfe, _ = jax.lax.fori_loop(0, num_blocks, block_step, carry)
  return tokens, nfe
