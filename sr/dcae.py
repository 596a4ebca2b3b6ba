"""DC-AE, the deep-compression autoencoder (arXiv 2410.10733) in SANA's `dc-ae-f32c32-sana-1.0` form.

Design doc sana_sr.md ("Building blocks", "Corrections and additions"). Images NHWC in [-1, 1]:

  Encoder  conv3x3 -> stages 0..S-1 (blocks, then a stride-2 downsampling into the next width)
           -> conv3x3 to the latent channels
  Decoder  conv3x3 from the latent -> stages S-1..0 (an upsampling from the wider stage, then blocks)
           -> RMSNorm, ReLU, conv3x3 to RGB

Every resampling, and the encoder's output and the decoder's input projection, adds a parameter-free
space-to-channel shortcut (the paper's residual autoencoding, Sec. 3.1): down, pixel_unshuffle then
averaging of channel groups; up, channel repetition then pixel_shuffle; both in torch's channel order
(channel-major, then the r x r offsets), as the public code. With S = 6 stages the latent is 32x
smaller than the image.
Blocks: "res" = x + RMSNorm(conv3x3(SiLU(conv3x3(x)))) (the second conv without bias); "evit" =
EfficientViT's block: x + LiteMLA(x), then x + RMSNorm(GLUMBConv(x)). LiteMLA: a 1x1 qkv projection,
a 5x5 depthwise + grouped 1x1 aggregation of it that doubles the heads (the multi-scale branch), ReLU
linear attention over all pixels (`kernels.linear_attention`, head dim 32), a 1x1 projection and
RMSNorm. The RMSNorm is over channels with a scale and a bias (the public code's TritonRMSNorm2d).
"""
from __future__ import annotations

import dataclasses
import functools

import einops
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype

from core import sharding
from core.nn.attention import QKV_AXES
from core.nn.conv import GroupedConv, Upsample
from core.nn.mlp import MixFFN
from kernels.linear_attention import linear_attention

BLOCKS = ("res", "evit")


def unshuffle_average(x_BxHxWxC: jax.Array, r: int, out_channels: int) -> jax.Array:
  """Space to channels, then the mean of each run of C r^2 / out consecutive channels:
  [B, H, W, C] -> [B, H/r, W/r, out]. Channels after the unshuffle run (c, row, col), torch's order."""
  b, h, w, c = x_BxHxWxC.shape
  if h % r or w % r or (c * r * r) % out_channels:
    raise ValueError(f"unshuffle_average: {x_BxHxWxC.shape} with r={r} cannot give {out_channels} "
                     f"channels (H, W divisible by r and C r^2 by the output channels)")
  x = einops.rearrange(x_BxHxWxC, "b (h p) (w q) c -> b h w (c p q)", p=r, q=r)
  return x.reshape(b, h // r, w // r, out_channels, -1).mean(-1)


def duplicate_shuffle(x_BxHxWxC: jax.Array, r: int, out_channels: int) -> jax.Array:
  """Each channel repeated out r^2 / C times in place, then channels to space (torch's order):
  [B, H, W, C] -> [B, rH, rW, out]."""
  c = x_BxHxWxC.shape[-1]
  if (out_channels * r * r) % c:
    raise ValueError(f"duplicate_shuffle: {out_channels} x {r}^2 channels are not a multiple of {c}")
  x = jnp.repeat(x_BxHxWxC, out_channels * r * r // c, axis=-1)
  return einops.rearrange(x, "b h w (c p q) -> b (h p) (w q) c", p=r, q=r)


class ChannelRMSNorm(nn.Module):
  """x / sqrt(mean_c x^2 + eps) * scale + bias over the last axis (eps 1e-5), statistics in float32."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return (y * scale + bias).astype(self.dtype)


def _conv(features, kernel=3, *, stride=1, groups=1, bias=True, name=None, dtype=jnp.float32,
          param_dtype=jnp.float32):
  """A torch-style conv: symmetric padding kernel // 2 (so stride 2 halves an even size)."""
  p = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                 feature_group_count=groups, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                 name=name)


class ResBlock(nn.Module):
  """DC-AE's ResBlock: x + RMSNorm(conv3x3(SiLU(conv3x3(x)))), [B, H, W, C] -> same."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    h = nn.silu(_conv(c, name="conv1", **kw)(x))
    h = _conv(c, bias=False, name="conv2", **kw)(h)
    return x + ChannelRMSNorm(name="norm", **kw)(h)


class LiteMLA(nn.Module):
  """EfficientViT's multi-scale ReLU linear attention over all H W pixels: [B, H, W, C] -> same.

  heads = C / head_dim; qkv [B, H, W, heads * 3 * head_dim] laid out (head, {q, k, v}, dim); each
  scale s adds a depthwise s x s conv of qkv and a 1x1 conv grouped per (head, q/k/v) as more heads.
  """
  head_dim: int = 32
  scales: tuple[int, ...] = (5,)
  eps: float = 1e-15                 # the public code's; keeps all-zero rows finite
  kernel_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if c % self.head_dim:
      raise ValueError(f"LiteMLA: channels {c} must be a multiple of head_dim {self.head_dim}")
    heads = c // self.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = _conv(3 * c, 1, bias=False, name="qkv", **kw)(x)
    branches = [qkv]
    for s in self.scales:
      agg = GroupedConv(3 * c, s, groups=3 * c, use_bias=False, name=f"aggreg_{s}_dw", **kw)(qkv)
      branches.append(GroupedConv(3 * c, 1, groups=3 * heads, use_bias=False, name=f"aggreg_{s}_pw",
                                  **kw)(agg))
    qkv = jnp.concatenate(branches, -1).reshape(b, h * w, -1, 3, self.head_dim)
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]            # [B, N, heads', dim]
    # Under a mesh the Pallas kernel runs per shard (XLA cannot partition it), as core's attention.
    fn = functools.partial(linear_attention, eps=self.eps, impl=self.kernel_impl)
    o = sharding.shard_kernel(fn, (q, k, v), (QKV_AXES,) * 3, QKV_AXES).reshape(b, h, w, -1)
    o = _conv(c, 1, bias=False, name="proj", **kw)(o)
    return ChannelRMSNorm(name="norm", **kw)(o)


class EViTBlock(nn.Module):
  """x + LiteMLA(x), then x + RMSNorm(GLUMBConv(x)) (GLUMBConv = core's Mix-FFN, expansion 4)."""
  head_dim: int = 32
  kernel_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + LiteMLA(self.head_dim, kernel_impl=self.kernel_impl, name="attn", **kw)(x)
    u = MixFFN(4 * c, name="glumbconv", **kw)(x.reshape(b, h * w, c), (h, w)).reshape(b, h, w, c)
    return x + ChannelRMSNorm(name="norm", **kw)(u)


@dataclasses.dataclass(frozen=True)
class Spec:
  """One autoencoder: per-stage widths, encoder / decoder depths and block kinds; latent channels."""
  widths: tuple[int, ...]
  encoder_depths: tuple[int, ...]
  decoder_depths: tuple[int, ...]
  blocks: tuple[str, ...]
  latent_channels: int = 32
  head_dim: int = 32

  def __post_init__(self):
    n = len(self.widths)
    if not (len(self.encoder_depths) == len(self.decoder_depths) == len(self.blocks) == n):
      raise ValueError(f"DC-AE spec: widths, depths and blocks need one entry per stage, got {self}")
    if any(kind not in BLOCKS for kind in self.blocks):
      raise ValueError(f"DC-AE blocks must be in {BLOCKS}, got {self.blocks}")

  @property
  def factor(self) -> int:
    return 2 ** (len(self.widths) - 1)


# The public dc-ae-f32c32-sana-1.0; and the same design at CPU size (f32, 32 latent channels).
SANA_F32C32 = Spec((128, 256, 512, 512, 1024, 1024), (2, 2, 2, 3, 3, 3), (3, 3, 3, 3, 3, 3),
                   ("res",) * 3 + ("evit",) * 3)
CPU_F32C32 = Spec((16, 32, 64, 64, 128, 128), (1, 1, 1, 1, 1, 1), (1, 1, 1, 1, 1, 1),
                  ("res",) * 3 + ("evit",) * 3)


def _stage(spec: Spec, i: int, depth: int, kw: dict, kernel_impl: str, prefix: str) -> list[nn.Module]:
  if spec.blocks[i] == "res":
    return [ResBlock(name=f"{prefix}{i}_block{j}", **kw) for j in range(depth)]
  return [EViTBlock(spec.head_dim, kernel_impl, name=f"{prefix}{i}_block{j}", **kw) for j in range(depth)]


class Encoder(nn.Module):
  """[B, H, W, 3] -> latent [B, H/f, W/f, latent_channels] (f = spec.factor)."""
  spec: Spec
  kernel_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s, kw = self.spec, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    f = s.factor
    if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"DC-AE encoder input must be [B, H, W, C] with H, W multiples of {f}, got "
                       f"{x.shape}")
    h = _conv(s.widths[0], name="project_in", **kw)(x.astype(self.dtype))
    for i, width in enumerate(s.widths):
      for block in _stage(s, i, s.encoder_depths[i], kw, self.kernel_impl, "stage"):
        h = block(h)
      if i < len(s.widths) - 1:
        nxt = s.widths[i + 1]
        h = _conv(nxt, stride=2, name=f"down{i}", **kw)(h) + unshuffle_average(h, 2, nxt)
    return (_conv(s.latent_channels, name="project_out", **kw)(h)
            + unshuffle_average(h, 1, s.latent_channels))


class Decoder(nn.Module):
  """latent [B, h, w, latent_channels] -> [B, f h, f w, 3]."""
  spec: Spec
  kernel_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    s, kw = self.spec, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if z.ndim != 4 or z.shape[-1] != s.latent_channels:
      raise ValueError(f"DC-AE decoder input must be [B, h, w, {s.latent_channels}], got {z.shape}")
    top = s.widths[-1]
    h = _conv(top, name="project_in", **kw)(z.astype(self.dtype)) + duplicate_shuffle(z, 1, top)
    for i in reversed(range(len(s.widths))):
      if i < len(s.widths) - 1:
        h = (Upsample(s.widths[i], "nearest", name=f"up{i}", **kw)(h)
             + duplicate_shuffle(h, 2, s.widths[i]))
      for block in _stage(s, i, s.decoder_depths[i], kw, self.kernel_impl, "stage"):
        h = block(h)
    h = nn.relu(ChannelRMSNorm(name="norm_out", **kw)(h))
    return _conv(3, name="project_out", **kw)(h).astype(jnp.float32)


class DCAE(nn.Module):
  """Encoder + decoder. `__call__` reconstructs; `encode` / `decode` (apply with method=...)."""
  spec: Spec
  kernel_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(kernel_impl=self.kernel_impl, dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(self.spec, **kw)
    self.decoder = Decoder(self.spec, **kw)

  def encode(self, x_BxHxWx3: jax.Array) -> jax.Array:
    return self.encoder(x_BxHxWx3)

  def decode(self, z_Bxhxwxc: jax.Array) -> jax.Array:
    return self.decoder(z_Bxhxwxc)

  def __call__(self, x_BxHxWx3: jax.Array) -> jax.Array:
    return self.decode(self.encode(x_BxHxWx3))
