"""Which masked positions a denoising round reveals (arXiv 2605.22967, from the authors' code).

Sudoku rule (`select_cumulative`): sort the masked cells by their uncertainty 1 - c (c = the maximum
predicted probability), and reveal them in that order while the running sum of 1 - c stays below tau,
always at least one per row that still has a masked cell. A larger tau reveals more per round: fewer
rounds (NFE), more mistakes.
LLM rule (`select_threshold`): reveal every masked position with c > tau, and always the most confident
one (per row, or per block of positions).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def confidence(logits_BxLxV: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(max softmax probability [B, L], argmax token [B, L]) of each position."""
  probs = jax.nn.softmax(logits_BxLxV.astype(jnp.promote_types(logits_BxLxV.dtype, jnp.float32)), -1)
  return probs.max(axis=-1), jnp.argmax(logits_BxLxV, axis=-1)


def select_cumulative(conf_BxL: jax.Array, masked_BxL: jax.Array, tau) -> jax.Array:
  """Boolean [B, L]: the masked cells to reveal this round.

  Args:
    conf_BxL: confidence in [0, 1] of each cell's prediction.
    masked_BxL: True where the cell is still masked.
    tau: scalar or [B]: the budget of summed uncertainty per row.
  """
  u_BxL = jnp.where(masked_BxL, 1.0 - conf_BxL.astype(jnp.float32), jnp.inf)
  order_BxL = jnp.argsort(u_BxL, axis=-1, stable=True)
  u_sorted = jnp.take_along_axis(u_BxL, order_BxL, axis=-1)
  tau_Bx1 = jnp.reshape(jnp.asarray(tau, jnp.float32), (-1, 1))
  take_sorted = jnp.cumsum(u_sorted, axis=-1) < tau_Bx1
  take_sorted = take_sorted.at[:, 0].set(True) & jnp.isfinite(u_sorted)
  inverse_BxL = jnp.argsort(order_BxL, axis=-1)
  return jnp.take_along_axis(take_sorted, inverse_BxL, axis=-1)


def select_threshold(conf_BxL: jax.Array, masked_BxL: jax.Array, tau,
                     block_size: int | None = None) -> jax.Array:
  """Boolean [B, L]: masked positions with confidence > tau, plus the most confident masked position
  of each row (of each block of `block_size` positions, when given) that has one."""
  b, length = masked_BxL.shape
  group = length if block_size is None else block_size
  if length % group:
    raise ValueError(f"length {length} is not a multiple of block_size {group}")
  c = jnp.where(masked_BxL, conf_BxL, -jnp.inf).reshape(b, length // group, group)
  best = jax.nn.one_hot(jnp.argmax(c, axis=-1), group, dtype=bool) & jnp.isfinite(c)
  tau_Bx1 = jnp.reshape(jnp.asarray(tau, jnp.float32), (-1, 1))
  return (best.reshape(b, length) | (conf_BxL > tau_Bx1)) & masked_BxL
