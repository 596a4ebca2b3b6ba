"""The Relay denoiser: a bidirectional transformer whose input embedding carries the previous round's
hidden state (the relay channel, arXiv 2605.22967).

Round k's input embedding is token_embedding(x_k) + LayerNorm(h_{k-1}), where h is the output of one
block (default: the last, before the final norm) in the previous round, and h_0 = 0. The LayerNorm is
the only parameter the channel adds. Variants from the paper's code: add it everywhere (Sudoku) or at
masked positions only (the LLM), and start its scale at 0 so that the channel is an exact no-op at
initialisation. Without the channel (`relay=False`) this is a plain masked-diffusion transformer.

Logits follow MDLM's SUBS parameterisation (arXiv 2406.07524 Sec. 3.2): the MASK token gets -inf, so
the model never predicts it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype

from core.nn.attention import MultiHeadAttention
from core.nn.embeddings import rope_1d
from core.nn.mlp import Mlp

RELAY_POSITIONS = ("all", "masked")


class Block(nn.Module):
  """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)), dropout on each branch."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attn_impl: str = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD, *, rope, mask=None, kv_prefix=None, return_kv=False,
               deterministic=True):
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype)
    attn = MultiHeadAttention(self.num_heads, impl=self.attn_impl, dtype=self.dtype, name="attn")
    a = attn(norm(name="norm1")(x_BxLxD), rope=rope, mask=mask, kv_prefix=kv_prefix,
             return_kv=return_kv)
    a, kv = a if return_kv else (a, None)
    x_BxLxD = x_BxLxD + nn.Dropout(self.dropout)(a, deterministic=deterministic)
    m = Mlp(self.mlp_dim, activation="relu", dtype=self.dtype, name="mlp")(norm(name="norm2")(x_BxLxD))
    x_BxLxD = x_BxLxD + nn.Dropout(self.dropout)(m, deterministic=deterministic)
    return x_BxLxD, kv


class RelayTransformer(nn.Module):
  """Masked-diffusion transformer with an optional relay channel.

  Attributes:
    vocab_size: V, MASK included. mask_id: the MASK token.
    width, depth, num_heads, mlp_dim: sizes (the paper's Sudoku model: 384, 4, 6, 1536).
    dropout: on the attention and MLP branches (0.1 in the paper) when deterministic=False.
    tie_embeddings: logits = final features @ token_embedding^T; else a separate output layer.
    relay: whether the relay channel exists (False: MLM and Rollout baselines).
    relay_positions: "all" or "masked": where LayerNorm(h) is added to the input embedding.
    relay_zero_init: start the relay LayerNorm's scale at 0 (an exact no-op at initialisation).
    relay_layer: index of the block whose output is relayed (negative counts from the end).
    attn_impl: see `core.nn.attention`.
  """
  vocab_size: int
  mask_id: int
  width: int = 384
  depth: int = 4
  num_heads: int = 6
  mlp_dim: int = 1536
  dropout: float = 0.0
  tie_embeddings: bool = True
  relay: bool = True
  relay_positions: str = "all"
  relay_zero_init: bool = False
  relay_layer: int = -1
  attn_impl: str = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens_BxL: jax.Array, h_BxLxD: jax.Array | None = None, *,
               positions_L: jax.Array | None = None, mask: jax.Array | None = None,
               kv_cache: list | None = None, return_kv: bool = False, deterministic: bool = True):
    """One denoising round.

    Args:
      tokens_BxL: int tokens, mask_id where masked.
      h_BxLxD: the previous round's relayed state (None or zeros in the first round); ignored
        without the relay channel.
      positions_L: token positions for the rotary embedding ([L] or [B, L]; default arange(L)).
      mask: attention mask broadcastable to [B, H, L, P + L] (True = attend).
      kv_cache: per block, cached (k, v) of earlier tokens ([B, P, H, D/H] each) to attend to.
      return_kv: also return each block's (k, v) of these tokens.
      deterministic: False applies dropout (needs a "dropout" rng).
    Returns:
      (logits_BxLxV in float32 (or wider) with -inf at mask_id, h_BxLxD the state to relay[, kv
      per block]).
    """
    if self.relay_positions not in RELAY_POSITIONS:
      raise ValueError(f"relay_positions must be one of {RELAY_POSITIONS}, got {self.relay_positions!r}")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    relay_layer = self.relay_layer % self.depth
    # N(0, 1) embeddings (PyTorch's default, which the authors' code uses): the token embedding and
    # LayerNorm(h), which has unit scale, then enter the first block on the same scale. With GPT-2's
    # N(0, 0.02) the relayed state would drown the tokens 50 to 1.
    embed = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(1.0),
                     dtype=self.dtype, name="embed")
    x_BxLxD = embed(tokens_BxL)
    if self.relay:
      h_BxLxD = jnp.zeros_like(x_BxLxD) if h_BxLxD is None else h_BxLxD.astype(x_BxLxD.dtype)
      scale_init = nn.initializers.zeros if self.relay_zero_init else nn.initializers.ones
      r_BxLxD = nn.LayerNorm(epsilon=1e-6, scale_init=scale_init, dtype=self.dtype,
                             name="relay_norm")(h_BxLxD)
      if self.relay_positions == "masked":
        r_BxLxD = r_BxLxD * (tokens_BxL == self.mask_id)[..., None]
      x_BxLxD = x_BxLxD + r_BxLxD
    length = tokens_BxL.shape[-1]
    positions = jnp.arange(length) if positions_L is None else positions_L
    rope = rope_1d(positions, self.width // self.num_heads)
    kvs, relayed = [], None
    for i in range(self.depth):
      x_BxLxD, kv = Block(self.num_heads, self.mlp_dim, self.dropout, self.attn_impl, self.dtype,
                          name=f"block_{i}")(
          x_BxLxD, rope=rope, mask=mask, kv_prefix=None if kv_cache is None else kv_cache[i],
          return_kv=return_kv, deterministic=deterministic)
      kvs.append(kv)
      if i == relay_layer:
        relayed = x_BxLxD
    y_BxLxD = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="final_norm")(x_BxLxD)
    if self.tie_embeddings:   # / sqrt(D): unit-scale features against N(0, 1) rows start at N(0, 1)
      logits = embed.attend(y_BxLxD) / jnp.sqrt(self.width).astype(y_BxLxD.dtype)
    else:
      logits = nn.Dense(self.vocab_size, dtype=self.dtype, name="out")(y_BxLxD)
    # float32 at least (float64 models stay float64: the KV-cache test relies on it).
    logits = logits.astype(jnp.promote_types(self.dtype, jnp.float32)).at[..., self.mask_id].set(-jnp.inf)
    return (logits, relayed, kvs) if return_kv else (logits, relayed)
