"""PiD's pixel diffusion transformer (arXiv 2605.23902; design doc pid.md, "Corrections" section).

The network maps a noisy high-resolution image x_t [B, H, W, 3], its time t and (through the adapter,
`decoders/adapter.py`) a possibly noisy latent to the rectified-flow velocity v = eps - x0.

Patch path: p x p patches -> width D; `depth` joint blocks (MMDiT, SD3 arXiv 2403.03206 Sec. 4: the
image tokens and the caption tokens keep their own weights and meet in one attention), adaLN-Zero from
silu(t_emb), RMSNorm, q/k RMSNorm, SwiGLU, 2-D RoPE on the image tokens with positions rescaled to span
[0, rope_span] whatever the grid. The caption is a learned null sequence (PiD decodes without text).
Time enters as 1000 t through a sinusoid with max_period 10, as the public code does.

Pixel path: every pixel is embedded by Linear(3 -> C) plus a full-image 2-D sin/cos position code; each
patch's p^2 x C pixel features are compressed by one Linear to a pixel-token of width D_pix, attended
over the patch grid, expanded back by a Linear and added with a gate; a per-pixel MLP C -> 4C -> C
follows. Every pixel and channel gets its own adaLN shift / scale / gate, produced per patch by a
Linear of s = silu(t_emb + final patch token). Output: RMSNorm(C) + a zero-initialised per-pixel
Linear(C -> 3), folded back to the image.

`PiD` composes the backbone with an optional adapter: the adapter's injections go in before every
`inject_every`-th joint block and into the pixel path's condition s. Parameters are
{"backbone": ..., "adapter": ...}, so the adapter can be trained on a frozen backbone.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype

from core.nn.attention import MultiHeadAttention, QKV_AXES, dot_product_attention
from core.nn.dit import AdaLN, modulate
from core.nn.embeddings import TimestepEmbedder, apply_rope, rope_2d, sincos_2d
from core.nn.mlp import Mlp, SwiGLU
from core.nn.norm import make_norm
from core.nn.partitioning import constrain, dense as named_dense
from core.nn.patch import patchify, unpatchify

TOKENS = ("batch", "length", "embed")


class JointBlock(nn.Module):
  """One MMDiT block: (image tokens [B, N, D], caption tokens [B, M, D], c [B, D]) -> both updated.

  Each stream: adaLN-Zero (6 vectors from silu(c)), RMSNorm, its own q/k/v (q/k RMSNorm per head),
  one softmax attention over the M + N concatenated tokens (RoPE on the image part only; the caption
  has no position), its own output projection and SwiGLU.
  """
  num_heads: int
  mlp_hidden: int
  attn_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD: jax.Array, ctx_BxMxD: jax.Array, c_BxD: jax.Array,
               rope: jax.Array) -> tuple[jax.Array, jax.Array]:
    d = x_BxNxD.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = functools.partial(named_dense, **kw)
    norm = functools.partial(make_norm, "rms", **kw)
    streams, qkvs = {"x": x_BxNxD, "ctx": ctx_BxMxD}, {}
    mods = {}
    for name, h in streams.items():
      mods[name] = AdaLN(6, "adaln_zero", name=f"{name}_adaln", **kw)(c_BxD, d)
      h = modulate(norm(affine=False, name=f"{name}_norm1")(h), mods[name][0], mods[name][1])
      q, k, v = (constrain(y.reshape(*y.shape[:-1], self.num_heads, -1), QKV_AXES) for y in
                 jnp.split(dense(3 * d, ("embed", None), name=f"{name}_qkv")(h), 3, axis=-1))
      q = norm(affine=True, name=f"{name}_q_norm")(q)
      k = norm(affine=True, name=f"{name}_k_norm")(k)
      qkvs[name] = (q, k, v)
    q_x, k_x, v_x = qkvs["x"]
    q_x, k_x = apply_rope(q_x, rope), apply_rope(k_x, rope)
    m = ctx_BxMxD.shape[1]
    q, k, v = (jnp.concatenate([c, x], axis=1)
               for c, x in zip(qkvs["ctx"], (q_x, k_x, v_x)))
    o = dot_product_attention(q, k, v, impl=self.attn_impl)
    outs = {"ctx": o[:, :m], "x": o[:, m:]}
    for name, h in streams.items():
      _, _, gate1, shift2, scale2, gate2 = mods[name]
      o = outs[name]
      h = h + gate1[:, None] * dense(d, ("heads", "embed"), name=f"{name}_out")(
          o.reshape(*o.shape[:2], d))
      u = modulate(norm(affine=False, name=f"{name}_norm2")(h), shift2, scale2)
      h = h + gate2[:, None] * SwiGLU(self.mlp_hidden, name=f"{name}_mlp", **kw)(u)
      streams[name] = h
    return streams["x"], streams["ctx"]


class PixelBlock(nn.Module):
  """One pixel-path block: pixel features [B, N, p^2, C] with the per-patch condition s [B, N, D].

    (shift1, scale1, gate1, shift2, scale2, gate2) = Linear(s) -> each [B, N, p^2, C]  (zero init)
    x <- x + gate1 * Expand(Attn(Compress(modulate(Norm(x), shift1, scale1))))
    x <- x + gate2 * MLP(modulate(Norm(x), shift2, scale2))
  Compress: Linear(p^2 C -> token_width) of the patch's flattened pixels; Expand its transpose shape.
  """
  token_width: int
  num_heads: int
  mlp_ratio: float = 4.0
  attn_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxPxC: jax.Array, s_BxNxD: jax.Array, rope: jax.Array) -> jax.Array:
    b, n, pp, ch = x_BxNxPxC.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mod = named_dense(6 * pp * ch, ("embed", None), kernel_init=nn.initializers.zeros, name="adaln",
                      **kw)(s_BxNxD).reshape(b, n, 6, pp, ch)
    shift1, scale1, gate1, shift2, scale2, gate2 = (mod[:, :, i] for i in range(6))
    norm = lambda name: make_norm("rms", affine=False, name=name, **kw)
    h = norm("norm1")(x_BxNxPxC) * (1 + scale1) + shift1
    tok = named_dense(self.token_width, (None, "embed"), name="compress", **kw)(h.reshape(b, n, pp * ch))
    tok = MultiHeadAttention(self.num_heads, qk_norm="rms", impl=self.attn_impl, name="attn",
                             **kw)(tok, rope=rope)
    back = named_dense(pp * ch, ("embed", None), name="expand", **kw)(tok).reshape(b, n, pp, ch)
    x_BxNxPxC = x_BxNxPxC + gate1 * back
    h = norm("norm2")(x_BxNxPxC) * (1 + scale2) + shift2
    return x_BxNxPxC + gate2 * Mlp(int(self.mlp_ratio * ch), name="mlp", **kw)(h)


class PixelDiT(nn.Module):
  """The backbone; `PiD` runs its pieces (embed, blocks, pixel_condition, pixel_head) in order.

  Attributes:
    patch_size: p (H and W must be multiples of it).
    width: D, the patch tokens' width; depth: joint blocks; num_heads: their heads.
    mlp_hidden: SwiGLU hidden width (4096 at D = 1536 in the public code).
    caption_tokens: M, the length of the learned null caption.
    pixel_channels: C, the per-pixel feature width (a multiple of 4, for the sin/cos code).
    pixel_depth: pixel blocks; pixel_width: D_pix, the compressed pixel-token width;
    pixel_heads: its attention heads.
    rope_span: RoPE positions run over [0, rope_span) on every grid.
    attn_impl: `core.nn.attention.IMPLS` (softmax implementations).
  """
  patch_size: int = 16
  width: int = 1536
  depth: int = 14
  num_heads: int = 24
  mlp_hidden: int = 4096
  caption_tokens: int = 16
  pixel_channels: int = 16
  pixel_depth: int = 2
  pixel_width: int = 1152
  pixel_heads: int = 16
  rope_span: float = 16.0
  attn_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.patch_embed = named_dense(self.width, (None, "embed"), **kw)
    self.t_embed = TimestepEmbedder(self.width, time_scale=1000.0, max_period=10.0, **kw)
    self.null_caption = self.param("null_caption", nn.initializers.normal(0.02),
                                   (self.caption_tokens, self.width), self.param_dtype)
    self.block = [JointBlock(self.num_heads, self.mlp_hidden, self.attn_impl, **kw)
                  for _ in range(self.depth)]
    self.pixel_embed = nn.Dense(self.pixel_channels, **kw)
    self.pixel_block = [PixelBlock(self.pixel_width, self.pixel_heads, attn_impl=self.attn_impl, **kw)
                        for _ in range(self.pixel_depth)]
    self.out_norm = make_norm("rms", affine=True, **kw)
    self.out = nn.Dense(3, kernel_init=nn.initializers.zeros, **kw)

  def grid(self, x_BxHxWx3: jax.Array) -> tuple[int, int]:
    """The patch grid (H / p, W / p); ValueError unless x is [B, H, W, 3] with H, W multiples of p."""
    p = self.patch_size
    if x_BxHxWx3.ndim != 4 or x_BxHxWx3.shape[-1] != 3 or x_BxHxWx3.shape[1] % p or \
        x_BxHxWx3.shape[2] % p:
      raise ValueError(f"PiD input must be [B, H, W, 3] with H and W multiples of the patch size {p}; "
                       f"got {x_BxHxWx3.shape}")
    return x_BxHxWx3.shape[1] // p, x_BxHxWx3.shape[2] // p

  def ropes(self, hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Rotary angles of the patch path's and the pixel path's attention on grid hw."""
    return (rope_2d(*hw, self.width // self.num_heads, span=self.rope_span),
            rope_2d(*hw, self.pixel_width // self.pixel_heads, span=self.rope_span))

  def embed(self, x_BxHxWx3: jax.Array, t_B: jax.Array, image_cond: jax.Array | None = None):
    """(patch tokens [B, N, D], caption [B, M, D], t_emb [B, D], pixel features [B, N, p^2, C]).

    image_cond [B, H, W, c] is concatenated to x's channels before both embeddings (the cascade
    baseline's conditioning on the upsampled decoded image)."""
    b, hgt, wid, _ = x_BxHxWx3.shape
    if jnp.shape(t_B) != (b,):
      raise ValueError(f"t_B must have shape [B] = ({b},), got {jnp.shape(t_B)}")
    p, ch = self.patch_size, self.pixel_channels
    x = x_BxHxWx3.astype(self.dtype)
    if image_cond is not None:
      if image_cond.shape[:3] != x.shape[:3]:
        raise ValueError(f"image_cond must be [B, H, W, c] with x's {x.shape[:3]}, got {image_cond.shape}")
      x = jnp.concatenate([x, image_cond.astype(self.dtype)], axis=-1)
    tokens = constrain(self.patch_embed(patchify(x, p)), TOKENS)
    caption = jnp.broadcast_to(self.null_caption.astype(self.dtype), (b, *self.null_caption.shape))
    t_emb = self.t_embed(t_B)
    pix = self.pixel_embed(x) + sincos_2d(hgt, wid, ch).reshape(hgt, wid, ch).astype(self.dtype)
    return tokens, caption, t_emb, patchify(pix, p).reshape(b, -1, p * p, ch)

  def pixel_condition(self, tokens_BxNxD: jax.Array, t_emb_BxD: jax.Array) -> jax.Array:
    """t_emb + the final patch tokens, [B, N, D]: the pixel path's condition before its SiLU."""
    return t_emb_BxD[:, None] + tokens_BxNxD

  def pixel_head(self, pix_BxNxPxC: jax.Array, s_BxNxD: jax.Array, rope: jax.Array,
                 shape: tuple[int, int]) -> jax.Array:
    """Pixel blocks, then the per-pixel output: -> velocity [B, H, W, 3] for shape = (H, W)."""
    for block in self.pixel_block:
      pix_BxNxPxC = block(pix_BxNxPxC, s_BxNxD, rope)
    out = self.out(self.out_norm(pix_BxNxPxC))          # [B, N, p^2, 3]
    b, n = out.shape[:2]
    return unpatchify(out.reshape(b, n, -1), self.patch_size, *shape, 3)


class PiD(nn.Module):
  """(x_t [B, H, W, 3], t [B], latent [B, h, w, c] or None, sigma_lat [B], keep [B]) -> v [B, H, W, 3].

  Attributes:
    backbone: the `PixelDiT`.
    adapter: a `decoders.adapter.Adapter`, or None (the backbone alone: pretraining, and the
      unconditional branch of classifier-free guidance).
    inject_every: the adapter injects before blocks 0, k, 2k, ... and into the pixel condition.
  """
  backbone: PixelDiT
  adapter: nn.Module | None = None
  inject_every: int = 2

  @property
  def num_injections(self) -> int:
    """Injection points: the joint blocks 0, k, 2k, ... plus the pixel path's condition."""
    return -(-self.backbone.depth // self.inject_every) + 1

  def __call__(self, x_BxHxWx3: jax.Array, t_B: jax.Array, latent: jax.Array | None = None,
               sigma_B: jax.Array | None = None, keep_B: jax.Array | None = None, *,
               return_colour: bool = False, features_at: int | None = None,
               image_cond: jax.Array | None = None):
    """Args:
      x_BxHxWx3: the noisy image x_t.
      t_B: pixel diffusion times in [0, 1].
      latent: [B, h, w, c] the (noisy) latent, or None for the unconditional model.
      sigma_B: the latent's noise level (default 0); enters only through the adapter's gates.
      keep_B: 1 where the latent is used, 0 where it is dropped (CFG training); default all 1.
      return_colour: also return the adapter's low-resolution colour prediction [B, H/s, W/s, 3].
      features_at: return the patch tokens [B, N, D] after this joint block instead (DMD2's GAN
        head reads the teacher's there); nothing after it is computed.
      image_cond: [B, H, W, c] images concatenated to x's channels (the cascade baseline).
    Returns:
      The velocity [B, H, W, 3] in float32 (and the colour prediction with return_colour).
    """
    bb = self.backbone
    hw = bb.grid(x_BxHxWx3)
    b = x_BxHxWx3.shape[0]
    rope, pixel_rope = bb.ropes(hw)
    tokens, caption, t_emb, pix = bb.embed(x_BxHxWx3, t_B, image_cond)
    lq, colour = None, None
    if latent is not None:
      if self.adapter is None:
        raise ValueError("a latent was given but this PiD has no adapter")
      sigma_B = jnp.zeros((b,), jnp.float32) if sigma_B is None else jnp.asarray(sigma_B, jnp.float32)
      if sigma_B.shape != (b,):
        raise ValueError(f"sigma_B must have shape [B] = ({b},), got {sigma_B.shape}")
      if self.adapter.num_injections != self.num_injections:
        raise ValueError(f"the adapter has {self.adapter.num_injections} heads but a backbone of depth "
                         f"{bb.depth} injected every {self.inject_every} blocks needs "
                         f"{self.num_injections}")
      lq, colour = self.adapter(latent, hw, keep_B=keep_B)
    elif return_colour:
      raise ValueError("return_colour needs a latent")
    for i, block in enumerate(bb.block):
      if lq is not None and i % self.inject_every == 0:
        tokens = self.adapter.inject(i // self.inject_every, tokens, lq[i // self.inject_every],
                                     sigma_B)
      tokens, caption = block(tokens, caption, t_emb, rope)
      if i == features_at:
        return tokens
    cond = bb.pixel_condition(tokens, t_emb)
    if lq is not None:
      cond = self.adapter.inject(self.num_injections - 1, cond, lq[-1], sigma_B)
    v = bb.pixel_head(pix, nn.silu(cond), pixel_rope, x_BxHxWx3.shape[1:3]).astype(jnp.float32)
    return (v, colour) if return_colour else v
