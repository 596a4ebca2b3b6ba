"""Convolutional pieces shared by the autoencoders (PiD's KL autoencoder, SANA-SR's DC-AE) and PiD's
adapter: pixel (un)shuffle, replicate padding, a padded conv, a pre-activation ResBlock with
GroupNorm, and down/up-sampling layers. Images are NHWC.
"""
from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype

PADDINGS = ("zeros", "replicate")
DOWN_KINDS = ("conv", "pixel_unshuffle")
UP_KINDS = ("nearest", "pixel_shuffle")


def pixel_unshuffle(x_BxHxWxC: jax.Array, r: int) -> jax.Array:
  """Space to channels: [B, H, W, C] -> [B, H/r, W/r, r*r*C], each r x r block flattened in (row,
  column, channel) order, as `core.nn.patchify` flattens a patch (torch's pixel_unshuffle orders
  the channels (channel, row, column) instead)."""
  if x_BxHxWxC.ndim != 4:
    raise ValueError(f"pixel_unshuffle needs x of shape [B, H, W, C], got {x_BxHxWxC.shape}")
  h, w = x_BxHxWxC.shape[1:3]
  if r < 1 or h % r or w % r:
    raise ValueError(f"pixel_unshuffle: height {h} and width {w} must be divisible by r={r}")
  return einops.rearrange(x_BxHxWxC, "b (h p) (w q) c -> b h w (p q c)", p=r, q=r)


def pixel_shuffle(x_BxHxWxC: jax.Array, r: int) -> jax.Array:
  """The inverse of `pixel_unshuffle`: [B, H, W, r*r*C] -> [B, H*r, W*r, C]."""
  if x_BxHxWxC.ndim != 4:
    raise ValueError(f"pixel_shuffle needs x of shape [B, H, W, C], got {x_BxHxWxC.shape}")
  c = x_BxHxWxC.shape[-1]
  if r < 1 or c % (r * r):
    raise ValueError(f"pixel_shuffle: channels {c} must be divisible by r*r={r * r}")
  return einops.rearrange(x_BxHxWxC, "b h w (p q c) -> b (h p) (w q) c", p=r, q=r)


def replicate_pad(x_BxHxWxC: jax.Array, pad: int | tuple[tuple[int, int], tuple[int, int]]
                  ) -> jax.Array:
  """Pads H and W by repeating the edge pixels: pad is one int for every side or
  ((top, bottom), (left, right))."""
  (top, bottom), (left, right) = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad
  if min(top, bottom, left, right) < 0:
    raise ValueError(f"replicate_pad: padding must be >= 0, got {pad}")
  return jnp.pad(x_BxHxWxC, ((0, 0), (top, bottom), (left, right), (0, 0)), mode="edge")


def same_padding(kernel_size: int, stride: int) -> tuple[int, int]:
  """(before, after) padding of one spatial axis so that a VALID conv gives H / stride outputs
  (TF's "SAME": total max(k - stride, 0), the odd pixel after, e.g. (0, 1) for a 3x3 stride-2
  downsampling as in latent-diffusion autoencoders)."""
  total = max(kernel_size - stride, 0)
  return total // 2, total - total // 2


class Conv(nn.Module):
  """A k x k convolution with zero or replicate padding that maps [B, H, W, C] to
  [B, H / stride, W / stride, features] (H and W divisible by stride; `same_padding`)."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: str = "zeros"
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    if self.padding not in PADDINGS:
      raise ValueError(f"Conv padding must be one of {PADDINGS}, got {self.padding!r}")
    h, w = x_BxHxWxC.shape[1:3]
    if h % self.stride or w % self.stride:
      raise ValueError(f"Conv: height {h} and width {w} must be divisible by stride {self.stride}")
    pads = (same_padding(self.kernel_size, self.stride),) * 2
    if self.padding == "replicate":
      x_BxHxWxC, pads = replicate_pad(x_BxHxWxC, pads), "VALID"
    return nn.Conv(self.features, (self.kernel_size,) * 2, strides=(self.stride,) * 2,
                   padding=pads, use_bias=self.use_bias, kernel_init=self.kernel_init,
                   dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x_BxHxWxC)


def group_norm(num_groups: int, channels: int, *, dtype: Dtype, param_dtype: Dtype,
               name: str | None = None) -> nn.GroupNorm:
  """GroupNorm (eps 1e-6, statistics in float32) with min(num_groups, channels) groups; ValueError
  unless that divides the channels."""
  groups = min(num_groups, channels)
  if channels % groups:
    raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
                      name=name)


class ResBlock(nn.Module):
  """Pre-activation residual block: x + conv(silu(GN(conv(silu(GN(x)))))), with a 1x1 conv on the
  skip when the channels change: [B, H, W, C] -> [B, H, W, features or C].

  The second conv is zero-initialised (`zero_init`), so a fresh block is the identity (or its skip
  projection), as in the latent-diffusion and DC-AE autoencoders.
  """
  features: int | None = None
  num_groups: int = 32
  padding: str = "zeros"
  zero_init: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    c_in = x_BxHxWxC.shape[-1]
    c_out = self.features or c_in
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(group_norm(self.num_groups, c_in, name="norm1", **kw)(x_BxHxWxC))
    h = Conv(c_out, 3, padding=self.padding, name="conv1", **kw)(h)
    h = nn.silu(group_norm(self.num_groups, c_out, name="norm2", **kw)(h))
    init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
    h = Conv(c_out, 3, padding=self.padding, kernel_init=init, name="conv2", **kw)(h)
    skip = x_BxHxWxC if c_out == c_in else Conv(c_out, 1, name="skip", **kw)(x_BxHxWxC)
    return skip + h


class Downsample(nn.Module):
  """Halves H and W: a 3x3 stride-2 conv ("conv"), or space-to-channels then a 1x1 conv
  ("pixel_unshuffle", DC-AE's shortcut-friendly form): [B, H, W, C] -> [B, H/2, W/2, features or C]."""
  features: int | None = None
  kind: str = "conv"
  padding: str = "zeros"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    if self.kind not in DOWN_KINDS:
      raise ValueError(f"Downsample kind must be one of {DOWN_KINDS}, got {self.kind!r}")
    c_out = self.features or x_BxHxWxC.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.kind == "conv":
      return Conv(c_out, 3, stride=2, padding=self.padding, name="conv", **kw)(x_BxHxWxC)
    return Conv(c_out, 1, name="conv", **kw)(pixel_unshuffle(x_BxHxWxC, 2))


class Upsample(nn.Module):
  """Doubles H and W: nearest-neighbour then a 3x3 conv ("nearest"), or a 3x3 conv to 4x the
  channels then channels-to-space ("pixel_shuffle"): [B, H, W, C] -> [B, 2H, 2W, features or C]."""
  features: int | None = None
  kind: str = "nearest"
  padding: str = "zeros"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    if self.kind not in UP_KINDS:
      raise ValueError(f"Upsample kind must be one of {UP_KINDS}, got {self.kind!r}")
    c_out = self.features or x_BxHxWxC.shape[-1]
    kw = dict(padding=self.padding, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.kind == "nearest":
      return Conv(c_out, 3, name="conv", **kw)(upsample_nearest(x_BxHxWxC, 2))
    return pixel_shuffle(Conv(4 * c_out, 3, name="conv", **kw)(x_BxHxWxC), 2)


def upsample_nearest(x_BxHxWxC: jax.Array, r: int) -> jax.Array:
  """Each pixel repeated r x r times: [B, H, W, C] -> [B, rH, rW, C]."""
  return jnp.repeat(jnp.repeat(x_BxHxWxC, r, axis=1), r, axis=2)


class GroupedConv(nn.Module):
  """A stride-1 k x k convolution with `groups` feature groups and symmetric padding k // 2 (k odd):
  [B, H, W, C] -> [B, H, W, features], the parameters of `nn.Conv(features, (k, k),
  feature_group_count=groups)` ("kernel" [k, k, C / groups, features], "bias" [features]).

  On a CPU its two grouped cases run as other ops, since XLA's CPU convolution is slow for them
  (measured: a 3 x 3 depthwise conv on [16, 32, 32, 64] took 29 ms, ~50x its plain-conv rate):
  depthwise (groups = C = features) as k^2 shifted multiply-adds, and 1 x 1 as a batched matmul
  per group. Elsewhere (GPU) it is `lax.conv_general_dilated`. Used by SANA's Mix-FFN and DC-AE's
  multi-scale LiteMLA.
  """
  features: int
  kernel_size: int
  groups: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    k, g, c = self.kernel_size, self.groups, x_BxHxWxC.shape[-1]
    if k % 2 != 1 or c % g or self.features % g:
      raise ValueError(f"GroupedConv: kernel {k} must be odd and channels {c} -> {self.features} "
                       f"divisible by groups {g}")
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, c // g, self.features),
                        self.param_dtype).astype(self.dtype)
    x = x_BxHxWxC.astype(self.dtype)
    if jax.default_backend() != "cpu" or not (g == c == self.features or k == 1):
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(k // 2, k // 2)] * 2,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=g)
    elif k == 1:
      xg = x.reshape(*x.shape[:-1], g, c // g)
      wg = kernel[0, 0].reshape(c // g, g, self.features // g).transpose(1, 0, 2)
      y = jnp.einsum("bhwgi,gio->bhwgo", xg, wg).reshape(*x.shape[:-1], self.features)
    else:
      h, w = x.shape[1:3]
      xp = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
      y = sum(xp[:, i:i + h, j:j + w] * kernel[i, j, 0] for i in range(k) for j in range(k))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
    return y
