"""Diffusion transformer (DiT, arXiv 2212.09748) with adaLN-Zero or adaLN-single conditioning.

The model maps (x_t, t, y) to the rectified-flow velocity v = eps - x0 (`core/flow.py`), t in
[0, 1] with t = 1 pure noise.
adaLN-single (PixArt-alpha, arXiv 2310.00426 Sec. 2.3; SANA, arXiv 2410.10629) replaces each block's
modulation MLP by one shared MLP of the time embedding plus a learned [6, width] table per block.
"""
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype

from core.nn.attention import MultiHeadAttention
from core.nn.embeddings import ConditionEmbedder, rope_2d, sincos_2d
from core.nn.mlp import MixFFN, Mlp, SwiGLU
from core.nn.norm import make_norm
from core.nn.patch import patchify, unpatchify

MODULATIONS = ("adaln_zero", "adaln_single")
MLPS = ("gelu", "swiglu", "mixffn")
POS_EMBEDS = ("sincos", "rope2d", "none")


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{field} must be one of {choices}, got {value!r}")


def modulate(x_BxNxD: jax.Array, shift_BxD: jax.Array, scale_BxD: jax.Array) -> jax.Array:
  """x * (1 + scale) + shift, broadcast over tokens: [B, N, D]."""
  return x_BxNxD * (1 + scale_BxD[:, None]) + shift_BxD[:, None]


class AdaLN(nn.Module):
  """`num` modulation vectors [B, D] (shifts, scales, gates) from the conditioning c.

  adaln_zero: a zero-initialised Dense "linear" of SiLU(c) for c [B, D], so every gate starts at 0
  and every block at the identity (DiT Sec. 3.2).
  adaln_single: c plus a learned "scale_shift_table" [num, D], for c [B, num * D] (the shared
  time MLP's output) or c [B, D] (added to every row, as PixArt's final layer).
  """
  num: int
  modulation: str = "adaln_zero"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, c: jax.Array, features: int) -> list[jax.Array]:
    _check_choice("modulation", self.modulation, MODULATIONS)
    if self.modulation == "adaln_zero":
      mod = nn.Dense(self.num * features, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="linear")(nn.silu(c))
    else:
      table = self.param("scale_shift_table", nn.initializers.normal(features ** -0.5),
                         (self.num, features), self.param_dtype)
      mod = c.reshape(c.shape[0], -1, features) + table.astype(self.dtype)
    mod = mod.reshape(c.shape[0], self.num, features)
    return [mod[:, i] for i in range(self.num)]


class DiTBlock(nn.Module):
  """Pre-norm transformer block modulated by the conditioning: [B, N, D] -> [B, N, D].

    x <- x + g1 * Attn(modulate(Norm(x), shift1, scale1))
    x <- x + CrossAttn(x, context)                      (cross_attention; PixArt-alpha Sec. 2.3)
    x <- x + g2 * MLP(modulate(Norm(x), shift2, scale2))

  Attributes:
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / D.
    mlp: "gelu" | "swiglu" | "mixffn".
    modulation: "adaln_zero" (c is [B, D]) | "adaln_single" (c is [B, 6D], see `DiT`).
    attn_impl: attention implementation (`core.nn.attention.IMPLS`), also for cross-attention.
    qk_norm: None | "layer" | "rms".
    norm: the (affine-free) block norm, "layer" | "rms".
    cross_attention: add the cross-attention sub-layer (then a context is required).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  mlp: str = "gelu"
  modulation: str = "adaln_zero"
  attn_impl: str = "xla"
  qk_norm: str | None = None
  norm: str = "layer"
  cross_attention: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD: jax.Array, c: jax.Array, *, hw: tuple[int, int] | None = None,
               rope: jax.Array | None = None, context_BxMxE: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    """Args:
      x_BxNxD: tokens.
      c: conditioning, [B, D] (adaln_zero) or [B, 6D] (adaln_single).
      hw: the (h, w) token grid; needed by mlp="mixffn".
      rope: rotary angles for self-attention (`rope_2d`), or None.
      context_BxMxE: cross-attention keys/values input.
      context_mask: boolean, broadcastable to [B, H, N, M]; True = attend.
    """
    _check_choice("mlp", self.mlp, MLPS)
    if self.cross_attention != (context_BxMxE is not None):
      raise ValueError(f"cross_attention={self.cross_attention} but context_BxMxE is "
                       f"{'missing' if context_BxMxE is None else 'given'}")
    d = x_BxNxD.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    adaln = AdaLN(6, self.modulation, name="adaln", **kw)
    shift1, scale1, gate1, shift2, scale2, gate2 = adaln(c, d)
    attn = lambda name: MultiHeadAttention(self.num_heads, qk_norm=self.qk_norm,
                                           impl=self.attn_impl, name=name, **kw)
    norm = lambda name: make_norm(self.norm, affine=False, name=name, **kw)

    h = modulate(norm("norm1")(x_BxNxD), shift1, scale1)
    x_BxNxD = x_BxNxD + gate1[:, None] * attn("attn")(h, rope=rope)
    if self.cross_attention:
      x_BxNxD = x_BxNxD + attn("cross_attn")(x_BxNxD, context_BxMxE, mask=context_mask)
    h = modulate(norm("norm2")(x_BxNxD), shift2, scale2)
    hidden = int(self.mlp_ratio * d)
    if self.mlp == "mixffn":
      if hw is None:
        raise ValueError("mlp='mixffn' needs the token grid hw=(h, w)")
      h = MixFFN(hidden, name="mlp", **kw)(h, hw)
    else:
      h = {"gelu": Mlp, "swiglu": SwiGLU}[self.mlp](hidden, name="mlp", **kw)(h)
    return x_BxNxD + gate2[:, None] * h


class FinalLayer(nn.Module):
  """Norm -> modulate -> zero-initialised Dense: [B, N, D] -> [B, N, out_features].

  The zero Dense makes a fresh model predict exactly 0 (DiT Sec. 3.2). c is the [B, D] condition
  embedding for both modulations.
  """
  out_features: int
  modulation: str = "adaln_zero"
  norm: str = "layer"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD: jax.Array, c_BxD: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shift, scale = AdaLN(2, self.modulation, name="adaln", **kw)(c_BxD, x_BxNxD.shape[-1])
    h = modulate(make_norm(self.norm, affine=False, name="norm", **kw)(x_BxNxD), shift, scale)
    return nn.Dense(self.out_features, kernel_init=nn.initializers.zeros, name="linear", **kw)(h)


class DiT(nn.Module):
  """(x_BxHxWxC, t_B in [0, 1], y_B or None) -> velocity [B, H, W, C].

  Attributes:
    patch_size: p; H and W must be multiples of it.
    width: token width D.
    depth: number of blocks.
    num_heads: attention heads (head dim D / num_heads).
    mlp_ratio: MLP hidden width / D (SANA's Mix-FFN uses 2.5).
    num_classes: 0 = unconditional; otherwise labels in [0, num_classes], num_classes being the
      null label for classifier-free guidance (y_B = None means all-null).
    pos_embed: "sincos" (fixed 2-D, added to the tokens) | "rope2d" (rotary, in attention) | "none"
      (SANA, which relies on Mix-FFN's convolution).
    modulation: "adaln_zero" | "adaln_single".
    mlp: "gelu" | "swiglu" | "mixffn".
    attn_impl: `core.nn.attention.IMPLS`.
    qk_norm: None | "layer" | "rms".
    norm: block norm, "layer" | "rms".
    cross_attention: blocks attend to context_BxMxE (e.g. text or low-resolution features).
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  patch_size: int = 2
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  num_classes: int = 0
  pos_embed: str = "sincos"
  modulation: str = "adaln_zero"
  mlp: str = "gelu"
  attn_impl: str = "xla"
  qk_norm: str | None = None
  norm: str = "layer"
  cross_attention: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, t_B: jax.Array, y_B: jax.Array | None = None, *,
               context_BxMxE: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    """Args:
      x_BxHxWxC: the noisy input x_t.
      t_B: times in [0, 1].
      y_B: int labels in [0, num_classes], or None.
      context_BxMxE: cross-attention input (required iff cross_attention).
      context_mask: boolean, broadcastable to [B, num_heads, N, M]; True = attend.
    Returns:
      The velocity, [B, H, W, C] in x's dtype.
    """
    _check_choice("pos_embed", self.pos_embed, POS_EMBEDS)
    b, hgt, wid, ch = x_BxHxWxC.shape
    p = self.patch_size
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = nn.Dense(self.width, name="patch_embed", **kw)(patchify(x_BxHxWxC, p))
    hw = (hgt // p, wid // p)
    rope = None
    if self.pos_embed == "sincos":
      tokens = tokens + sincos_2d(*hw, self.width).astype(tokens.dtype)
    elif self.pos_embed == "rope2d":
      rope = rope_2d(*hw, self.width // self.num_heads)

    c_BxD = ConditionEmbedder(self.width, self.num_classes, name="cond", **kw)(t_B, y_B, batch=b)
    c_blocks = c_BxD
    if self.modulation == "adaln_single":
      c_blocks = nn.Dense(6 * self.width, name="t_block", **kw)(nn.silu(c_BxD))
    block_kw = dict(mlp_ratio=self.mlp_ratio, mlp=self.mlp, modulation=self.modulation,
                    attn_impl=self.attn_impl, qk_norm=self.qk_norm, norm=self.norm,
                    cross_attention=self.cross_attention, **kw)
    for i in range(self.depth):
      block = DiTBlock(self.num_heads, name=f"block_{i}", **block_kw)
      tokens = block(tokens, c_blocks, hw=hw, rope=rope, context_BxMxE=context_BxMxE,
                     context_mask=context_mask)
    final = FinalLayer(p * p * ch, modulation=self.modulation, norm=self.norm, name="final", **kw)
    out = final(tokens, c_BxD)
    return unpatchify(out, p, hgt, wid, ch).astype(x_BxHxWxC.dtype)
