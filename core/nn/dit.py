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
    head_dim: self-attention's per-head width (default D / num_heads; set when heads were pruned).
    mlp_hidden: the MLP's hidden width, overriding mlp_ratio x D (set when channels were pruned).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  mlp: str = "gelu"
  modulation: str = "adaln_zero"
  attn_impl: str = "xla"
  qk_norm: str | None = None
  norm: str = "layer"
  cross_attention: bool = False
  head_dim: int | None = None
  mlp_hidden: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD: jax.Array, c: jax.Array, *, hw: tuple[int, int] | None = None,
               rope: jax.Array | None = None, context_BxMxE: jax.Array | None = None,
               context_mask: jax.Array | None = None,
               modulated_input_only: bool = False) -> jax.Array:
    """Args:
      x_BxNxD: tokens.
      c: conditioning, [B, D] (adaln_zero) or [B, 6D] (adaln_single).
      hw: the (h, w) token grid; needed by mlp="mixffn".
      rope: rotary angles for self-attention (`rope_2d`), or None.
      context_BxMxE: cross-attention keys/values input.
      context_mask: boolean, broadcastable to [B, H, N, M]; True = attend.
      modulated_input_only: return modulate(Norm(x), shift1, scale1) [B, N, D], the attention's
        input, and compute nothing after it (TeaCache's signal, arXiv 2411.19108 Sec. 3.3).
    """
    _check_choice("mlp", self.mlp, MLPS)
    d = x_BxNxD.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    adaln = AdaLN(6, self.modulation, name="adaln", **kw)
    shift1, scale1, gate1, shift2, scale2, gate2 = adaln(c, d)
    attn = lambda name, heads=self.num_heads, head_dim=None: MultiHeadAttention(
        heads, qk_norm=self.qk_norm, impl=self.attn_impl, head_dim=head_dim, name=name, **kw)
    norm = lambda name: make_norm(self.norm, affine=False, name=name, **kw)

    h = modulate(norm("norm1")(x_BxNxD), shift1, scale1)
    if modulated_input_only:
      return h
    if self.cross_attention != (context_BxMxE is not None):
      raise ValueError(f"cross_attention={self.cross_attention} but context_BxMxE is "
                       f"{'missing' if context_BxMxE is None else 'given'}")
    if self.num_heads:      # a block whose every head was pruned keeps only its MLP
      x_BxNxD = x_BxNxD + gate1[:, None] * attn("attn", head_dim=self.head_dim)(h, rope=rope)
    if self.cross_attention:
      x_BxNxD = x_BxNxD + attn("cross_attn")(x_BxNxD, context_BxMxE, mask=context_mask)
    h = modulate(norm("norm2")(x_BxNxD), shift2, scale2)
    hidden = int(self.mlp_ratio * d) if self.mlp_hidden is None else self.mlp_hidden
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
  embedding for both modulations. out_features may instead be given at call time (the DiT learns
  its channel count from its input).
  """
  out_features: int | None = None
  modulation: str = "adaln_zero"
  norm: str = "layer"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD: jax.Array, c_BxD: jax.Array,
               out_features: int | None = None) -> jax.Array:
    out_features = out_features or self.out_features
    if out_features is None:
      raise ValueError("FinalLayer needs out_features, as an attribute or at call time")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shift, scale = AdaLN(2, self.modulation, name="adaln", **kw)(c_BxD, x_BxNxD.shape[-1])
    h = modulate(make_norm(self.norm, affine=False, name="norm", **kw)(x_BxNxD), shift, scale)
    return nn.Dense(out_features, kernel_init=nn.initializers.zeros, name="linear", **kw)(h)


class DiT(nn.Module):
  """(x_BxHxWxC, t_B in [0, 1], y_B or None) -> velocity [B, H, W, C (or out_channels)].

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
    out_channels: the velocity's channels; default C, the input's (set when the input carries a
      condition concatenated to x_t, e.g. SANA-SR's multi-step baseline).
    block_heads, block_mlp_hidden: per-block self-attention heads (each of width D / num_heads)
      and MLP hidden widths, for a structurally pruned model (`sr/prune.py`); None = num_heads and
      mlp_ratio x D in every block. When given, their length is the depth.
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
  out_channels: int | None = None
  block_heads: tuple[int, ...] | None = None
  block_mlp_hidden: tuple[int, ...] | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def num_blocks(self) -> int:
    return self.depth if self.block_heads is None else len(self.block_heads)

  # The pieces of __call__ are methods, for samplers that run them separately through
  # `model.apply(variables, ..., method=...)` (TeaCache, flowrl/cache); submodules are therefore
  # built in setup, under the same names (and parameter tree) as an inline definition would give.
  def setup(self):
    _check_choice("pos_embed", self.pos_embed, POS_EMBEDS)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.patch_embed = nn.Dense(self.width, **kw)
    self.cond = ConditionEmbedder(self.width, self.num_classes, **kw)
    if self.modulation == "adaln_single":
      self.t_block = nn.Dense(6 * self.width, **kw)
    pruned = self.block_heads is not None or self.block_mlp_hidden is not None
    if pruned and (self.block_heads is None or self.block_mlp_hidden is None
                   or len(self.block_heads) != len(self.block_mlp_hidden)):
      raise ValueError(f"block_heads {self.block_heads} and block_mlp_hidden {self.block_mlp_hidden} "
                       "must be given together, with one entry per block")
    if pruned and self.cross_attention:
      raise ValueError("a pruned DiT (block_heads) cannot have cross-attention: its heads are not pruned")
    heads = self.block_heads or (self.num_heads,) * self.depth
    hidden = self.block_mlp_hidden or (None,) * self.depth
    head_dim = self.width // self.num_heads if pruned else None
    self.block = [DiTBlock(h, mlp_ratio=self.mlp_ratio, mlp=self.mlp, modulation=self.modulation,
                           attn_impl=self.attn_impl, qk_norm=self.qk_norm, norm=self.norm,
                           cross_attention=self.cross_attention, head_dim=head_dim, mlp_hidden=m,
                           **kw)
                  for h, m in zip(heads, hidden)]   # named block_0, block_1, ...
    self.final = FinalLayer(modulation=self.modulation, norm=self.norm, **kw)

  def embed(self, x_BxHxWxC: jax.Array, t_B: jax.Array,
            y_B: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The input side: (tokens [B, N, D] with their position embedding, condition c [B, D])."""
    p = self.patch_size
    tokens = self.patch_embed(patchify(x_BxHxWxC, p))
    if self.pos_embed == "sincos":
      hgt, wid = x_BxHxWxC.shape[1] // p, x_BxHxWxC.shape[2] // p
      tokens = tokens + sincos_2d(hgt, wid, self.width).astype(tokens.dtype)
    return tokens, self.cond(t_B, y_B, batch=x_BxHxWxC.shape[0])

  def _block_condition(self, c_BxD: jax.Array) -> jax.Array:
    """What the blocks are modulated by: c [B, D], or the shared time MLP's [B, 6D] (adaln_single)."""
    return self.t_block(nn.silu(c_BxD)) if self.modulation == "adaln_single" else c_BxD

  def blocks(self, tokens_BxNxD: jax.Array, c_BxD: jax.Array, hw: tuple[int, int], *,
             context_BxMxE: jax.Array | None = None,
             context_mask: jax.Array | None = None) -> jax.Array:
    """Every block on tokens of the (H / p, W / p) grid hw: [B, N, D] -> [B, N, D]."""
    rope = rope_2d(*hw, self.width // self.num_heads) if self.pos_embed == "rope2d" else None
    c_blocks = self._block_condition(c_BxD)
    for block in self.block:
      tokens_BxNxD = block(tokens_BxNxD, c_blocks, hw=hw, rope=rope, context_BxMxE=context_BxMxE,
                           context_mask=context_mask)
    return tokens_BxNxD

  def first_block_input(self, tokens_BxNxD: jax.Array, c_BxD: jax.Array) -> jax.Array:
    """block_0's timestep-modulated normalised input [B, N, D] (TeaCache, arXiv 2411.19108)."""
    return self.block[0](tokens_BxNxD, self._block_condition(c_BxD), modulated_input_only=True)

  def head(self, tokens_BxNxD: jax.Array, c_BxD: jax.Array,
           shape: tuple[int, int, int]) -> jax.Array:
    """The output side: tokens [B, N, D] -> velocity [B, H, W, C] for shape = (H, W, C)."""
    hgt, wid, ch = shape
    p = self.patch_size
    return unpatchify(self.final(tokens_BxNxD, c_BxD, p * p * ch), p, hgt, wid, ch)

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
    hw = (x_BxHxWxC.shape[1] // self.patch_size, x_BxHxWxC.shape[2] // self.patch_size)
    tokens, c_BxD = self.embed(x_BxHxWxC, t_B, y_B)
    tokens = self.blocks(tokens, c_BxD, hw, context_BxMxE=context_BxMxE, context_mask=context_mask)
    shape = (*x_BxHxWxC.shape[1:3], self.out_channels or x_BxHxWxC.shape[-1])
    return self.head(tokens, c_BxD, shape).astype(x_BxHxWxC.dtype)
