"""Token-wise feed-forward layers of the transformer blocks: GELU MLP, SwiGLU and SANA's Mix-FFN."""
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype

from core.nn.conv import GroupedConv
from core.nn.partitioning import constrain, dense as named_dense

# Up-projections split their outputs over "mlp", down-projections their inputs (opposite dims).
UP, DOWN, HIDDEN = ("embed", "mlp"), ("mlp", "embed"), ("batch", "length", "mlp")


ACTIVATIONS = {"gelu": functools.partial(nn.gelu, approximate=True), "relu": nn.relu}


class Mlp(nn.Module):
  """Dense -> activation -> Dense: [..., D] -> [..., out_features or D].

  activation: "gelu" (tanh approximation, as DiT) or "relu" (as the original transformer).
  """
  hidden: int
  out_features: int | None = None
  activation: str = "gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"Mlp activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
    dense = functools.partial(named_dense, dtype=self.dtype, param_dtype=self.param_dtype)
    h = ACTIVATIONS[self.activation](dense(self.hidden, UP, name="fc1")(x))
    if h.ndim == 3:
      h = constrain(h, HIDDEN)
    return dense(self.out_features or x.shape[-1], DOWN, name="fc2")(h)


class SwiGLU(nn.Module):
  """(SiLU(x W_g) * x W_u) W_o (arXiv 2002.05202 Eq. 6): [..., D] -> [..., out_features or D].

  W_g and W_u are one Dense "fc1" of 2 * hidden outputs (gate first).
  """
  hidden: int
  out_features: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(named_dense, dtype=self.dtype, param_dtype=self.param_dtype)
    gate, up = jnp.split(dense(2 * self.hidden, UP, name="fc1")(x), 2, axis=-1)
    return dense(self.out_features or x.shape[-1], DOWN, name="fc2")(nn.silu(gate) * up)


class MixFFN(nn.Module):
  """SANA's Mix-FFN (GLUMBConv; arXiv 2410.10629 Sec. 2.2): [B, h*w, D] -> [B, h*w, out or D].

  1x1 expand to 2 * hidden + SiLU, 3x3 depthwise conv over the (h, w) token grid (the block's only
  source of position information: SANA uses no position embedding), GLU a * SiLU(gate), 1x1 project
  (no bias, as SANA's point conv).
  """
  hidden: int
  out_features: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """x_BxNxD: tokens of an (h, w) grid in row-major order (`patchify`'s order); hw = (h, w)."""
    b, n, d = x_BxNxD.shape
    h, w = hw
    if h * w != n:
      raise ValueError(f"MixFFN: grid hw={hw} has {h * w} cells but x has {n} tokens")
    dense = functools.partial(named_dense, dtype=self.dtype, param_dtype=self.param_dtype)
    u = nn.silu(dense(2 * self.hidden, UP, name="fc1")(x_BxNxD)).reshape(b, h, w, 2 * self.hidden)
    u = GroupedConv(2 * self.hidden, 3, groups=2 * self.hidden, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="dwconv")(u)
    a, gate = jnp.split(u.reshape(b, n, 2 * self.hidden), 2, axis=-1)
    return dense(self.out_features or d, DOWN, use_bias=False, name="fc2")(a * nn.silu(gate))
