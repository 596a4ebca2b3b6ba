"""Time, label and position embeddings: sinusoids, rotary angles (1-D, 2-D), conditioning MLPs.

Rotary embeddings are passed around as *angles* [..., N, D/2] (D = head dim); `apply_rope` turns the
pairs (x_i, x_{i + D/2}) of every head by them ("rotate-half" pairing, as in GPT-NeoX), so the 1-D
and 2-D variants share one apply.
"""
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype


def _frequencies(n: int, max_period: float) -> jax.Array:
  """[n] float32 geometric frequencies max_period^(-i / n), i = 0..n-1."""
  return jnp.exp(-math.log(max_period) * jnp.arange(n, dtype=jnp.float32) / n)


def _grid_positions(h: int, w: int) -> tuple[jax.Array, jax.Array]:
  """Row and column indices [h*w] of an (h, w) grid in row-major order (the order of `patchify`)."""
  rows, cols = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
  return rows.reshape(-1), cols.reshape(-1)


def timestep_embedding(t_B: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (dim/2)).

  As in DiT (arXiv 2212.09748) after the Transformer's position code (arXiv 1706.03762 Sec. 3.5).
  The frequencies resolve differences of order 1 in t, so callers scale t in [0, 1] up first
  (`TimestepEmbedder` multiplies by 1000).

  Args:
    t_B: [B] (or any shape [...]) times or positions.
    dim: embedding size; an odd dim gets a trailing zero channel.
    max_period: longest period.
  Returns:
    [B, dim] (resp. [..., dim]) float32.
  """
  args = jnp.asarray(t_B, jnp.float32)[..., None] * _frequencies(dim // 2, max_period)
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return emb


def sincos_2d(h: int, w: int, dim: int) -> jax.Array:
  """Fixed 2-D sin-cos position embedding [h*w, dim] for a row-major (h, w) token grid.

  The first dim/2 channels are a sinusoid of the row index, the rest of the column index (MAE,
  arXiv 2111.06377; DiT's default). Returns float32.
  """
  if dim % 4:
    raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
  rows, cols = _grid_positions(h, w)
  return jnp.concatenate([timestep_embedding(rows, dim // 2), timestep_embedding(cols, dim // 2)],
                         axis=-1)


def rope_1d(positions_N: jax.Array, head_dim: int, *, base: float = 10000.0) -> jax.Array:
  """Rotary angles [N, head_dim/2] = position * base^(-2i / head_dim) (RoFormer, arXiv 2104.09864).

  positions_N may carry leading batch axes ([B, N] -> [B, N, head_dim/2]).
  """
  if head_dim % 2:
    raise ValueError(f"rope_1d needs an even head_dim, got {head_dim}")
  return jnp.asarray(positions_N, jnp.float32)[..., None] * _frequencies(head_dim // 2, base)


def rope_2d(h: int, w: int, head_dim: int, *, base: float = 10000.0,
            span: float | None = None) -> jax.Array:
  """Rotary angles [h*w, head_dim/2] for a row-major (h, w) grid of image tokens.

  The first half of the angles turn with the row index and the second with the column, so half of
  the head dim rotates with each axis and q.k depends only on (dy, dx) (FLUX- / PiD-style 2-D RoPE).
  span: None keeps integer positions; a number rescales them to row * span / h and col * span / w,
  so every grid covers the same position range (PiD's public code uses span 16 at any resolution).
  """
  if head_dim % 4:
    raise ValueError(f"rope_2d needs head_dim divisible by 4, got {head_dim}")
  rows, cols = _grid_positions(h, w)
  if span is not None:
    rows, cols = rows * (span / h), cols * (span / w)
  return jnp.concatenate([rope_1d(rows, head_dim // 2, base=base),
                          rope_1d(cols, head_dim // 2, base=base)], -1)


def apply_rope(x_BxNxHxD: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates each head's pairs (x_i, x_{i + D/2}) by angles[..., n, i].

  Args:
    x_BxNxHxD: queries or keys.
    angles: [N, D/2] or [B, N, D/2] from `rope_1d` / `rope_2d`.
  Returns:
    [B, N, H, D] in x's dtype (the rotation itself runs in float32).
  """
  d = x_BxNxHxD.shape[-1]
  if angles.shape[-1] * 2 != d or angles.shape[-2] != x_BxNxHxD.shape[1]:
    raise ValueError(f"rope angles must have shape [N, D/2] or [B, N, D/2] = [..., "
                     f"{x_BxNxHxD.shape[1]}, {d // 2}] for x of shape {x_BxNxHxD.shape}, "
                     f"got {angles.shape}")
  angles = angles[..., None, :]  # broadcast over heads
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x_BxNxHxD.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxNxHxD.dtype)


class TimestepEmbedder(nn.Module):
  """t in [0, 1] -> [B, features]: sinusoid of time_scale * t, then Dense-SiLU-Dense (DiT).

  Attributes:
    features: output width.
    freq_dim: size of the sinusoid fed to the MLP.
    time_scale: t is multiplied by this first; 1000 matches DiT's integer timesteps.
    max_period: the sinusoid's longest period (PiD's public code uses 10).
  """
  features: int
  freq_dim: int = 256
  time_scale: float = 1000.0
  max_period: float = 10000.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_B: jax.Array) -> jax.Array:
    emb = timestep_embedding(self.time_scale * jnp.asarray(t_B, jnp.float32), self.freq_dim,
                             self.max_period)
    dense = lambda name: nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=nn.initializers.normal(0.02), name=name)
    return dense("fc2")(nn.silu(dense("fc1")(emb)))


class LabelEmbedder(nn.Module):
  """Class label [B] -> [B, features] from a table with num_classes + 1 rows.

  Row `num_classes` is the null label of classifier-free guidance (arXiv 2207.12598); label
  dropout is the caller's: it passes the null id where the label is dropped. Labels outside
  [0, num_classes] give NaN rows (jnp.take's fill mode), which shows in the loss.
  """
  num_classes: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y_B: jax.Array) -> jax.Array:
    table = self.param("embedding", nn.initializers.normal(0.02),
                       (self.num_classes + 1, self.features), self.param_dtype)
    return jnp.take(table, y_B, axis=0).astype(self.dtype)


class ConditionEmbedder(nn.Module):
  """(t_B, y_B or None) -> [B, features]: time embedding plus (with classes) label embedding.

  With num_classes > 0, y_B = None means "unconditional" (every label is the null id num_classes).
  With num_classes = 0, labels are an error.
  """
  features: int
  num_classes: int = 0
  freq_dim: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_B: jax.Array, y_B: jax.Array | None, *, batch: int) -> jax.Array:
    """t_B and y_B must have shape [batch], the batch of the model's input."""
    if jnp.shape(t_B) != (batch,):
      raise ValueError(f"t_B must have shape [B] = ({batch},), got {jnp.shape(t_B)}")
    c = TimestepEmbedder(self.features, self.freq_dim, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="t_embed")(t_B)
    if not self.num_classes:
      if y_B is not None:
        raise ValueError("labels y_B were given but num_classes = 0 (an unconditional model)")
      return c
    if y_B is None:
      y_B = jnp.full((batch,), self.num_classes, jnp.int32)
    elif jnp.shape(y_B) != (batch,):
      raise ValueError(f"y_B must have shape [B] = ({batch},), got {jnp.shape(y_B)}")
    return c + LabelEmbedder(self.num_classes, self.features, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="y_embed")(y_B)
