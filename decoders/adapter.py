"""PiD's sigma-aware adapter (arXiv 2605.23902; design doc pid.md): latent -> gated injections.

1. Alignment: the latent [B, h, w, c] is brought to the backbone's patch grid (gh, gw): nearest
   upsampling when it is coarser (each latent cell covers r = scale x AE factor / patch patches), a
   space-to-channel fold (pixel_unshuffle) when it is finer.
2. Projector: conv3x3, SiLU, conv3x3, then `num_res_blocks` pre-activation ResBlocks with GroupNorm
   (4 groups) to `hidden` features per grid cell (replicate padding, as v1.5).
3. One zero-initialised Dense head per injection point maps the features to the backbone width; the
   last head feeds the pixel path's condition (v1.5's 8th head).
4. Each injection goes through its own sigma-aware gate (`core.nn.gate.SigmaGate`, the Pallas kernel
   `kernels.sigma_gate`): x <- x + sigmoid(Linear([x, lq]) - exp(log_alpha) sigma_lat) lq, per
   channel (v1) or per token (v1.5), with w ~ N(0, 0.01^2), b = 2, alpha = 5.
Because the heads start at zero, a fresh adapter leaves the backbone's output exactly unchanged, and
sigma_lat reaches the output only through the gates.

v1.5's auxiliary colour head predicts the low-resolution RGB image from the projector features
(`colour_scale` LR pixels per grid cell); its loss lives in `decoders/task.py`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype

from core import nn as cnn


def align_to_grid(latent_Bxhxwxc: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
  """The latent on the patch grid: [B, h, w, c] -> [B, gh, gw, c'] with c' = c (upsampled, or equal
  sizes) or c r^2 (folded by r = h / gh). Both axes must share one integer ratio."""
  _, h, w, _ = latent_Bxhxwxc.shape
  gh, gw = grid_hw
  if gh * w != gw * h:
    raise ValueError(f"latent grid {h}x{w} and patch grid {gh}x{gw} have different aspect ratios")
  if gh >= h and gh % h == 0:
    return cnn.upsample_nearest(latent_Bxhxwxc, gh // h) if gh > h else latent_Bxhxwxc
  if h % gh == 0:
    return cnn.pixel_unshuffle(latent_Bxhxwxc, h // gh)
  raise ValueError(f"latent grid {h}x{w} and patch grid {gh}x{gw}: neither divides the other "
                   "(scale x AE factor / patch size must be an integer or its inverse)")


class Adapter(nn.Module):
  """(latent [B, h, w, c], patch grid (gh, gw)) -> (per-injection features, colour prediction).

  Attributes:
    width: the backbone's patch width D (every head's output).
    num_injections: heads (and gates): the injection points of `decoders.pid.PiD`.
    hidden: projector width (512-1024 in the public code).
    num_res_blocks: ResBlocks after the two convs (4).
    num_groups: their GroupNorm groups (4).
    gate_kind: "channel" (v1) or "token" (v1.5).
    gate_impl: `kernels.sigma_gate` impl ("auto" | "pallas" | "xla").
    colour_scale: LR pixels per grid cell along each axis (patch / scale), or 0 for no colour head.
  """
  width: int
  num_injections: int
  hidden: int = 1024
  num_res_blocks: int = 4
  num_groups: int = 4
  gate_kind: str = "token"
  gate_impl: str = "auto"
  padding: str = "replicate"
  colour_scale: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.conv_in = cnn.Conv(self.hidden, 3, padding=self.padding, **kw)
    self.conv_mid = cnn.Conv(self.hidden, 3, padding=self.padding, **kw)
    self.res = [cnn.ResBlock(self.hidden, num_groups=self.num_groups, padding=self.padding, **kw)
                for _ in range(self.num_res_blocks)]
    self.head = [nn.Dense(self.width, kernel_init=nn.initializers.zeros, **kw)
                 for _ in range(self.num_injections)]
    self.gate = [cnn.SigmaGate(self.gate_kind, self.gate_impl, param_dtype=self.param_dtype)
                 for _ in range(self.num_injections)]
    if self.colour_scale:
      self.colour_head = nn.Dense(3 * self.colour_scale ** 2, **kw)

  def features(self, latent_Bxhxwxc: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """The projector's features [B, gh, gw, hidden]."""
    if latent_Bxhxwxc.ndim != 4:
      raise ValueError(f"the adapter's latent must be [B, h, w, c], got {latent_Bxhxwxc.shape}")
    h = self.conv_mid(nn.silu(self.conv_in(align_to_grid(latent_Bxhxwxc.astype(self.dtype), grid_hw))))
    for block in self.res:
      h = block(h)
    return h

  def __call__(self, latent_Bxhxwxc: jax.Array, grid_hw: tuple[int, int], *,
               keep_B: jax.Array | None = None) -> tuple[list[jax.Array], jax.Array | None]:
    """(num_injections features [B, gh gw, width] (zero where keep_B is 0),
    colour [B, gh r, gw r, 3] or None), r = colour_scale."""
    f = self.features(latent_Bxhxwxc, grid_hw)
    b = f.shape[0]
    tokens = f.reshape(b, -1, self.hidden)
    keep = jnp.ones((b,), self.dtype) if keep_B is None else jnp.asarray(keep_B, self.dtype)
    lq = [head(tokens) * keep[:, None, None] for head in self.head]
    colour = None
    if self.colour_scale:
      colour = cnn.pixel_shuffle(self.colour_head(f), self.colour_scale).astype(jnp.float32)
    return lq, colour

  def inject(self, index: int, x_BxNxD: jax.Array, lq_BxNxD: jax.Array,
             sigma_B: jax.Array) -> jax.Array:
    """Injection point `index`: x + sigmoid(gate logit - alpha sigma) lq, [B, N, D]."""
    return self.gate[index](x_BxNxD, lq_BxNxD, sigma_B)
