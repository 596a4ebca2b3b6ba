"""A residual-MLP velocity field for low-dimensional toy data (2-D mixtures, moons, ...)."""
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype

from core.nn.embeddings import ConditionEmbedder
from core.nn.mlp import Mlp


class FlowMLP(nn.Module):
  """(x_BxF, t_B in [0, 1], y_B or None) -> velocity [B, F].

  h = Dense(x); depth times h <- h + Mlp(LayerNorm(h) + c) with c the time (+ label) embedding,
  so every block sees the condition; out = Dense(LayerNorm(h)).

  Attributes:
    width: hidden width (also the MLPs' hidden size).
    depth: residual blocks.
    num_classes: 0 = unconditional; otherwise labels in [0, num_classes] (num_classes = null).
  """
  width: int = 256
  depth: int = 4
  num_classes: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxF: jax.Array, t_B: jax.Array, y_B: jax.Array | None = None) -> jax.Array:
    b, f = x_BxF.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, **kw)
    c = ConditionEmbedder(self.width, self.num_classes, name="cond", **kw)(t_B, y_B, batch=b)
    h = nn.Dense(self.width, name="in_proj", **kw)(x_BxF)
    for i in range(self.depth):
      h = h + Mlp(self.width, name=f"block_{i}", **kw)(norm(name=f"norm_{i}")(h) + c)
    return nn.Dense(f, name="out_proj", **kw)(norm(name="norm_out")(h)).astype(x_BxF.dtype)
