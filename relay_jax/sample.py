"""Iterative unmasking with the relay state carried between rounds (arXiv 2605.22967).

Each round runs the model on (x, h), reveals the cells the rule picks with their argmax tokens, and
(for a relay model) passes the chosen block's output on as the next round's h. Revealed cells, clues
included, never change. A row stops when nothing in it is masked; its NFE counts the rounds it took.
At the round cap every cell still masked is revealed.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from relay_jax import unmask


def reveal_round(state, logits_BxLxV: jax.Array, h_new_BxLxD: jax.Array, *, mask_id: int,
                 select: Callable, tau, max_rounds: int):
  """The bookkeeping of one denoising round, given the model's output on state's tokens.

  Args:
    state: (x [B, L] tokens, h [B, L, D] relayed state, nfe int32 [B], r int32 [] rounds so far).
    logits_BxLxV, h_new_BxLxD: the model's output on x.
    select: (conf, masked, tau) -> boolean [B, L] cells to reveal.
  Returns:
    The next state: the selected masked cells take their argmax tokens (all of them at the last
    allowed round), rows that were unfinished take h_new and count one more NFE.
  """
  x, h, nfe, r = state
  masked = x == mask_id
  active_B = masked.any(-1)
  conf, pred = unmask.confidence(logits_BxLxV)
  reveal = jnp.where(r == max_rounds - 1, masked, select(conf, masked, tau))
  x = jnp.where(reveal, pred, x).astype(x.dtype)
  h = jnp.where(active_B[:, None, None], h_new_BxLxD.astype(h.dtype), h)
  return x, h, nfe + active_B.astype(jnp.int32), r + 1


def unmask_loop(apply: Callable, params, x_BxL: jax.Array, *, mask_id: int, width: int, tau,
                max_rounds: int = 64, use_relay: bool = True, select: Callable | None = None,
                return_trajectory: bool = False):
  """Runs rounds until every row is done or `max_rounds` is reached.

  Args:
    apply: `relay_jax.objectives.Apply`, called with key None and clean None.
    x_BxL: start tokens (mask_id where unknown).
    width: D, the relayed state's width.
    tau: the rule's parameter (scalar or [B]).
    use_relay: carry h between rounds (False: every round sees h = None, the MLM/Rollout models).
    select: (conf, masked, tau) -> reveal; default `unmask.select_cumulative`.
    return_trajectory: also return the tokens after each round, [max_rounds, B, L] (runs all
      max_rounds iterations; finished rows stay as they are).
  Returns:
    (tokens [B, L], nfe int32 [B]) and, with return_trajectory, the trajectory.
  """
  select = select or unmask.select_cumulative
  b, length = x_BxL.shape

  def round_fn(state):
    x, h = state[:2]
    logits, h_new = apply(params, x, h if use_relay else None, None, None)
    return reveal_round(state, logits, h_new, mask_id=mask_id, select=select, tau=tau,
                        max_rounds=max_rounds)

  state = (x_BxL.astype(jnp.int32), jnp.zeros((b, length, width), jnp.float32),
           jnp.zeros((b,), jnp.int32), jnp.zeros((), jnp.int32))
  if return_trajectory:
    def scan_fn(state, _):
      state = round_fn(state)
      return state, state[0]
    (x, _, nfe, _), traj = jax.lax.scan(scan_fn, state, None, length=max_rounds)
    return x, nfe, traj
  x, _, nfe, _ = jax.lax.while_loop(
      lambda s: (s[3] < max_rounds) & (s[0] == mask_id).any(), round_fn, state)
  return x, nfe
