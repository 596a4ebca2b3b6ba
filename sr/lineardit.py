"""SANA's LinearDiT (arXiv 2410.10629 Sec. 2.2), SANA-SR's generative prior, and its softmax twin.

A SANA block is `core.nn.DiTBlock` in this configuration (design doc sana_sr.md):
  adaLN-single   one time MLP shared by every block -> 6 x width, plus each block's learned
                 [6, width] scale/shift table; LayerNorm without affine parameters
  attention      ReLU linear self-attention (`kernels.linear_attention`, eps 1e-8, head dim 32),
                 no positional embedding
  cross-attn     optional, without modulation or gate
  Mix-FFN        1x1 to 2 x 2.5 width, SiLU, 3x3 depthwise conv, GLU, 1x1 back (the only source of
                 position information)
on latent tokens of patch size 1; the final layer is modulated by the raw time embedding plus its
own [2, width] table. `build(spec, attention="xla")` is the softmax-attention twin of the same size
(the quadratic baseline of the SANA-SR table).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax.typing import Dtype

from core.nn.attention import IMPLS
from core.nn.dit import DiT


@dataclasses.dataclass(frozen=True)
class Spec:
  """A LinearDiT's size: token width, blocks, heads (head dim width / heads), Mix-FFN ratio."""
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 2.5
  cross_attention: bool = False

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"LinearDiT width {self.width} must be a multiple of num_heads {self.num_heads}")


# SANA-0.6B's trunk (its text cross-attention left out: SANA-SR has no prompt, sana_sr.md's MAC
# arithmetic), and the 19-block trunk of the design doc's 407.95 G construction.
SANA_600M = Spec(width=1152, depth=28, num_heads=36)
SANA_SR_19 = Spec(width=1152, depth=19, num_heads=36)


def build(spec: Spec, *, attention: str = "linear", dtype: Dtype = jnp.float32) -> DiT:
  """The LinearDiT of `spec` (attention "linear"), or its twin with another `core.nn.attention` impl
  ("xla" / "cudnn" / "auto" softmax). Call it as DiT: (z_t [B, h, w, C], t [B]) -> velocity."""
  if attention not in IMPLS:
    raise ValueError(f"attention must be one of {IMPLS}, got {attention!r}")
  return DiT(patch_size=1, width=spec.width, depth=spec.depth, num_heads=spec.num_heads,
             mlp_ratio=spec.mlp_ratio, num_classes=0, pos_embed="none", modulation="adaln_single",
             mlp="mixffn", attn_impl=attention, norm="layer", cross_attention=spec.cross_attention,
             dtype=dtype)
