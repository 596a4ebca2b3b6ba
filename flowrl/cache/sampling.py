"""Training-free accelerated Euler sampling: one sampler, interchangeable caching policies.

  x0, nfe_B = sample(model, params, x_T, 50, vde(stable_step=6, interval=3), y=y, cfg_scale=2.0)

Policies (see each factory): `full`, `fewer_steps`, `vde` (arXiv 2605.23381, the released fixed
schedule), three adaptive VDE schedules of ours (`vde_adaptive`, `vde_residual`, `vde_budget`),
`teacache` (arXiv 2411.19108), `easycache` (arXiv 2507.02860) and `fora` (arXiv 2407.01425). Every
VDE policy takes reorthogonalize=True, an ablation that deviates from the released code. Notation of
`core/flow.py`: t = 1 is noise, the Euler step from t to s < t is x_s = x_t + (s - t) v.

Skipping is real, so wall-clock savings are too:
- static policies (full, fewer_steps, vde, fora) know their full steps before sampling; full and
  fewer_steps are `flow.euler_sample`, vde and fora unroll the steps in Python at trace time, so a
  skipped step holds no network call in the compiled program;
- dynamic policies (the adaptive VDE schedules, teacache, easycache) decide while sampling: a
  `lax.scan` over the steps whose network call sits in one branch of a `lax.cond` (`lax.switch` over
  the subsets of branches for TeaCache's per-branch decisions), which XLA executes alone on CPU and GPU.
A batch shares one decision per step (the signals are means over the whole batch, as in the public
code run with a batch); `sample(..., per_sample=True)` decides for each sample alone.

With classifier-free guidance the model's K = 2 velocity branches (conditional, unconditional) are
evaluated on one stacked batch and cached (and, for VDE, decomposed) separately; they are mixed as
`flow.cfg_velocity` does only for the Euler step. TeaCache decides for each branch on its own, as its
public CFG code does, and may run the blocks on one branch's rows only. The NFE counts whole
evaluations: a branch computed alone counts 1 / K.
"""
from __future__ import annotations

import functools
import inspect
import itertools
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from core import flow
from flowrl.cache import vde as vde_math


class Network(NamedTuple):
  """A velocity model cut where the caching policies need it, for K branches (K = 2 with guidance).

  embed: (x [B, ...], t [B]) -> (h, c), the cheap input side of every branch: pytrees whose leaves
    have K * B rows, branch-major (rows k B .. (k + 1) B - 1 belong to branch k).
  signal: (h, c) -> TeaCache's signal [K * B, ...] (the first block's modulated input).
  blocks: (h, c) -> h, the expensive part, row by row: it may be given the rows of some branches
    only. One call on every row is one network function evaluation (NFE).
  head: (h, c) -> v [K, B, ...], the output side, on every row.
  combine: v [K, B, ...] -> v [B, ...], the velocity that is integrated.
  """
  embed: Callable[[jax.Array, jax.Array], tuple[Any, Any]]
  signal: Callable[[Any, Any], jax.Array]
  blocks: Callable[[Any, Any], Any]
  head: Callable[[Any, Any], jax.Array]
  combine: Callable[[jax.Array], jax.Array]


def first_branch(v_KxB: jax.Array) -> jax.Array:
  """combine for a single branch (no guidance)."""
  return v_KxB[0]


def guidance(scale) -> Callable[[jax.Array], jax.Array]:
  """combine for [conditional, unconditional]: v_u + scale (v_c - v_u), as `flow.cfg_velocity`."""
  return lambda v_2xB: flow.cfg_mix(v_2xB[0], v_2xB[1], scale)


def _guided_rows(cond, null_cond):
  """cond's leaves [B, ...] stacked over [conditional; unconditional] rows, as `flow.cfg_velocity`."""
  return jax.tree.map(
      lambda c, n: jnp.concatenate([c, jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)]),
      cond, null_cond)


def velocity_network(velocity_fn: Callable[..., jax.Array], cond: Any = None, null_cond: Any = None,
                     cfg_scale: float = 1.0) -> Network:
  """A Network around a plain velocity function, conditioned as `flow.cfg_velocity`.

  velocity_fn: (x [N, ...], t [N]) -> v [N, ...] when cond is None, else (x, t, cond) -> v with cond a
  pytree of [N, ...] leaves (e.g. int labels [N]). cond: the batch's condition ([B, ...] leaves);
  with cfg_scale != 1 the K = 2 branches are the rows [conditional; unconditional], the latter with
  null_cond (broadcast like cond's leaves), mixed by `guidance(cfg_scale)`; otherwise K = 1.
  It has no inside: the "blocks" are the whole function on the rows they are given, TeaCache's signal
  is x itself and its residual v - x (so teacache and fora still run, as input-level caches).
  """
  guided = cfg_scale != 1.0
  if guided and (cond is None or null_cond is None):
    raise ValueError(f"cond and null_cond are required for guidance (cfg_scale = {cfg_scale} != 1); "
                     f"got cond={'None' if cond is None else 'given'}, "
                     f"null_cond={'None' if null_cond is None else 'given'}")
  num_branches = 2 if guided else 1
  rows_cond = _guided_rows(cond, null_cond) if guided else cond

  def embed(x, t_B):
    rows = lambda a: jnp.concatenate([a] * num_branches)
    return rows(x), (rows(t_B), rows_cond)

  def blocks(h, c):
    t_N, cond_N = c
    return velocity_fn(h, t_N) if cond_N is None else velocity_fn(h, t_N, cond_N)

  return Network(embed=embed, signal=lambda h, c: h, blocks=blocks,
                 head=lambda h, c: h.reshape(num_branches, -1, *h.shape[1:]),
                 combine=guidance(cfg_scale) if guided else first_branch)


def dit_network(model, params, shape: tuple[int, int, int], *, y: jax.Array | None = None,
                cfg_scale: float = 1.0) -> Network:
  """The Network of a `core.nn.DiT` for inputs [B, *shape], conditioned as `core.flow_task.make_sampler`.

  y: int labels [B] of a class-conditional model; with cfg_scale != 1 the null label model.num_classes
  gives the unconditional branch (K = 2), otherwise K = 1.
  """
  variables = {"params": params}
  apply = lambda method, *args: model.apply(variables, *args, method=method)
  guided = bool(model.num_classes) and cfg_scale != 1.0
  if model.num_classes and y is None:
    raise ValueError("y (int labels [B]) is required by a class-conditional model")
  hw = (shape[0] // model.patch_size, shape[1] // model.patch_size)
  num_branches = 2 if guided else 1

  def embed(x, t_B):
    labels = y if model.num_classes else None
    if guided:   # the batch [conditional; unconditional], as flow.cfg_velocity builds it
      x, t_B = jnp.concatenate([x, x]), jnp.concatenate([t_B, t_B])
      labels = jnp.concatenate([y, jnp.full_like(y, model.num_classes)])
    return apply("embed", x, t_B, labels)

  def head(h, c):   # float32 velocities whatever the compute dtype, so cached ones match
    v = apply("head", h, c, shape).astype(jnp.float32)
    return v.reshape(num_branches, -1, *v.shape[1:])

  return Network(embed=embed, signal=lambda h, c: apply("first_block_input", h, c),
                 blocks=lambda h, c: apply("blocks", h, c, hw), head=head,
                 combine=guidance(cfg_scale) if guided else first_branch)


def network_velocity(net: Network, x: jax.Array, t_B: jax.Array) -> jax.Array:
  """Every branch's velocity v [K, B, ...] at x [B, ...], t [B]: one network evaluation."""
  h, c = net.embed(x, t_B)
  return net.head(net.blocks(h, c), c)


def _mean_abs(a) -> jax.Array:
  return jnp.mean(jnp.abs(a))


def _stack(x: jax.Array, num_branches: int) -> jax.Array:
  """x [B, ...] repeated for every branch and flattened to [K * B, ...]."""
  return jnp.broadcast_to(x, (num_branches, *x.shape)).reshape(num_branches * x.shape[0], *x.shape[1:])


def _branch_rows(tree, branches: tuple[int, ...], num_branches: int):
  """The rows of the given branches (static, increasing) of every leaf [K * B, ...]: [len * B, ...]."""
  def take(a):
    a_K = a.reshape(num_branches, -1, *a.shape[1:])[jnp.asarray(branches)]
    return a_K.reshape(-1, *a.shape[1:])
  return jax.tree.map(take, tree)


def _set_branch_rows(tree, rows_tree, branches: tuple[int, ...], num_branches: int):
  """tree's leaves [K * B, ...] with the rows of the given branches replaced by rows_tree's."""
  def put(a, rows):
    a_K = a.reshape(num_branches, -1, *a.shape[1:])
    return a_K.at[jnp.asarray(branches)].set(rows.reshape(len(branches), *a_K.shape[1:])).reshape(a.shape)
  return jax.tree.map(put, tree, rows_tree)


def _num_branches(h, x: jax.Array) -> int:
  """K, from the rows [K * B, ...] of embed's output h and the batch x [B, ...]."""
  return jax.tree.leaves(h)[0].shape[0] // x.shape[0]


# ----------------------------------------------------------------------------------------------
# The two step loops. A policy supplies, over its own state pytree:
#   decide(net, state, i, last, x, t) -> (compute, state, aux)   every step; cheap
#   evaluate(net, state, aux, i, x, t) -> (v [K, B, ...], state)   runs the network
#   estimate(net, state, aux, i, x, t) -> (v [K, B, ...], state)   does not
# i is the step index (an int in the static loop, traced in the dynamic one), last whether it is the
# final step, t the step's time. A dynamic policy that decides per branch returns compute [K] (bool)
# and supplies evaluate_branches(net, computed, state, aux, i, x, t) for every static tuple
# `computed` of K bools instead of evaluate and estimate.


def euler_step(net: Network, x: jax.Array, t, s, v_K: jax.Array) -> jax.Array:
  """x_s = x_t + (s - t) v for x [B, ...] and the branches v [K, B, ...] mixed by net.combine."""
  return flow.euler_step(x, net.combine(v_K), t, s)


def _run_static(net, policy, state, x_T, grid, pattern: tuple[bool, ...]):
  """Python loop: the network appears only at the steps where pattern is True."""
  x = x_T
  for i, compute in enumerate(pattern):
    t, s = grid[i], grid[i + 1]
    _, state, aux = policy.decide(net, state, i, i == len(pattern) - 1, x, t)
    v_K, state = (policy.evaluate if compute else policy.estimate)(net, state, aux, i, x, t)
    x = euler_step(net, x, t, s, v_K)
  return x, jnp.asarray(sum(pattern), jnp.float32)


def _run_dynamic(net, policy, state, x_T, grid):
  """lax.scan over the steps; the network runs inside the taken branch of a lax.cond, or, for
  per-branch decisions compute [K], of a lax.switch over the 2^K subsets of branches computed."""
  num_steps = grid.shape[0] - 1

  def step(carry, its):
    x, state, nfe = carry
    i, t, s = its
    compute, state, aux = policy.decide(net, state, i, i == num_steps - 1, x, t)
    if jnp.ndim(compute) == 0:
      v_K, state = jax.lax.cond(compute, functools.partial(policy.evaluate, net),
                                functools.partial(policy.estimate, net), state, aux, i, x, t)
    else:
      subsets = list(itertools.product((False, True), repeat=compute.shape[0]))
      index = jnp.sum(compute.astype(jnp.int32) * 2 ** jnp.arange(compute.shape[0] - 1, -1, -1))
      v_K, state = jax.lax.switch(
          index, [functools.partial(policy.evaluate_branches, net, c) for c in subsets],
          state, aux, i, x, t)
    return (euler_step(net, x, t, s, v_K), state, nfe + jnp.mean(compute.astype(jnp.float32))), None

  (x, _, nfe), _ = jax.lax.scan(step, (x_T, state, jnp.float32(0)),
                                (jnp.arange(num_steps), grid[:-1], grid[1:]))
  return x, nfe


def _t_batch(t, x):
  return jnp.full((x.shape[0],), t, jnp.float32)


def _velocity_shape(net, x_T) -> jax.ShapeDtypeStruct:
  return jax.eval_shape(lambda x: network_velocity(net, x, _t_batch(1.0, x)), x_T)


def _check_int(name: str, value, minimum: int) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
  return int(value)


def _check_float(name: str, value) -> jax.Array:
  if not isinstance(value, (int, float, np.floating, np.integer)) or value < 0:
    raise ValueError(f"{name} must be a float >= 0; got {value!r}")
  return jnp.float32(value)


# ----------------------------------------------------------------------------------------------
# Policies. flax.struct dataclasses: float settings are pytree leaves (a jitted sampler taking the
# policy as an argument compiles once per policy kind and schedule), ints are static.


@flax.struct.dataclass
class Full:
  """Plain Euler on a grid of `steps` steps (None: the sampler's num_steps)."""
  steps: int | None = flax.struct.field(pytree_node=False, default=None)

  def run(self, net, x_T, num_steps, shift):
    grid = flow.time_grid(self.steps or num_steps, shift=shift)
    x = flow.euler_sample(lambda x, t_B: net.combine(network_velocity(net, x, t_B)), x_T, grid)
    return x, jnp.asarray(grid.shape[0] - 1, jnp.float32)


def full() -> Full:
  """Every step evaluates the model: `flow.euler_sample`, the reference."""
  return Full()


def fewer_steps(n: int) -> Full:
  """Plain Euler with n steps on the same shifted grid family (`flow.time_grid(n, shift)`)."""
  return Full(steps=_check_int("n (the number of Euler steps)", n, 1))


class _VDEState(NamedTuple):
  t_prev: jax.Array      # the last two anchors (t, alpha [K * B], beta [K * B])
  alpha_prev: jax.Array
  beta_prev: jax.Array
  t_last: jax.Array
  alpha_last: jax.Array
  beta_last: jax.Array
  u_last: jax.Array      # [K * B, ...], the direction of the last full evaluation


class _VDEMixin:
  """Evaluation, anchoring and estimation shared by the fixed and the adaptive VDE schedules."""

  @staticmethod
  def init(net, x_T) -> _VDEState:
    k, b, *rest = _velocity_shape(net, x_T).shape
    zeros = jnp.zeros((k * b,), jnp.float32)
    # Distinct dummy anchor times keep the (unused) slopes finite before the first anchors.
    return _VDEState(jnp.float32(-1), zeros, zeros, jnp.float32(0), zeros, zeros,
                     jnp.zeros((k * b, *rest), jnp.float32))

  def evaluate(self, net, state, aux, i, x, t):
    v_K = network_velocity(net, x, _t_batch(t, x))
    alpha, beta, u = vde_math.decompose(v_K.reshape(-1, *x.shape[1:]), _stack(x, v_K.shape[0]))
    # Anchors are kept from step stable_step - 1 on (arXiv 2605.23381's released code).
    anchored = _VDEState(state.t_last, state.alpha_last, state.beta_last,
                         jnp.asarray(t, jnp.float32), alpha, beta, u)
    keep = i >= self.stable_step - 1
    return v_K, jax.tree.map(lambda a, b: jnp.where(keep, a, b), anchored, state._replace(u_last=u))

  def estimate(self, net, state, aux, i, x, t):
    s = state
    alpha = vde_math.extrapolate(t, s.t_prev, s.alpha_prev, s.t_last, s.alpha_last)
    beta = vde_math.extrapolate(t, s.t_prev, s.beta_prev, s.t_last, s.beta_last)
    k = alpha.shape[0] // x.shape[0]
    x_rows = _stack(x, k)
    u = vde_math.reorthogonalize(s.u_last, x_rows) if self.reorthogonalize else s.u_last
    return vde_math.recompose(alpha, beta, u, x_rows).reshape(k, *x.shape), state


@flax.struct.dataclass
class VDE(_VDEMixin):
  """VDE's fixed schedule (see `vde`)."""
  stable_step: int = flax.struct.field(pytree_node=False)
  interval: int = flax.struct.field(pytree_node=False)
  reorthogonalize: bool = flax.struct.field(pytree_node=False, default=False)

  def decide(self, net, state, i, last, x, t):
    return None, state, None

  def run(self, net, x_T, num_steps, shift):
    full_steps = set(vde_math.full_step_indices(num_steps, self.stable_step, self.interval))
    pattern = tuple(i in full_steps for i in range(num_steps))
    return _run_static(net, self, self.init(net, x_T), x_T, flow.time_grid(num_steps, shift=shift),
                       pattern)


def _check_bool(name: str, value) -> bool:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be a bool; got {value!r}")
  return bool(value)


def vde(stable_step: int = 6, interval: int = 3, *, reorthogonalize: bool = False) -> VDE:
  """VDE with the released code's fixed schedule (`vde.full_step_indices`).

  A skipped step uses v = alpha x + beta ||x|| u with alpha, beta extrapolated linearly in t through
  the last two anchors and u of the last full evaluation (arXiv 2605.23381, Sec. 3).
  reorthogonalize: an ablation, a DEVIATION from the released code: a skipped step first makes u
  orthogonal to the current x again (`vde.reorthogonalize`). The same in every VDE policy.
  """
  return VDE(stable_step=_check_int("stable_step", stable_step, 1),
             interval=_check_int("interval", interval, 1),
             reorthogonalize=_check_bool("reorthogonalize", reorthogonalize))


@flax.struct.dataclass
class VDEAdaptive(_VDEMixin):
  """VDE with our adaptive schedule (see `vde_adaptive`)."""
  tolerance: jax.Array
  stable_step: int = flax.struct.field(pytree_node=False)
  reorthogonalize: bool = flax.struct.field(pytree_node=False, default=False)

  def decide(self, net, state, i, last, x, t):
    s = state
    speed = jnp.mean(jnp.abs(s.alpha_last - s.alpha_prev) + jnp.abs(s.beta_last - s.beta_prev))
    drift = speed / jnp.abs(s.t_last - s.t_prev) * jnp.abs(t - s.t_last)
    return (i <= self.stable_step) | last | (drift >= self.tolerance), state, None

  def run(self, net, x_T, num_steps, shift):
    vde_math.full_step_indices(num_steps, self.stable_step, 1)   # stable_step < num_steps
    return _run_dynamic(net, self, self.init(net, x_T), x_T, flow.time_grid(num_steps, shift=shift))


def vde_adaptive(tolerance: float, stable_step: int = 6, *,
                 reorthogonalize: bool = False) -> VDEAdaptive:
  """VDE whose full evaluations come sooner where alpha and beta move fast (our rule (a)).

  The paper (arXiv 2605.23381) describes an adaptive interval but its code uses fixed ones. Ours:
  every step i <= stable_step and the last step are evaluated, as in `vde`; afterwards, from the last
  two anchors (t_p, alpha_p, beta_p) and (t_l, alpha_l, beta_l), the scalars' speed
      speed = mean over samples and branches of (|alpha_l - alpha_p| + |beta_l - beta_p|) / |t_l - t_p|
  predicts how far they have moved by the current t, drift = speed |t - t_l|; the step is evaluated
  (and re-anchors) once drift >= tolerance, and otherwise estimated as in `vde`. So the interval is
  about tolerance / (speed |dt|) steps: short where the scalars change fast. tolerance 0 evaluates
  every step, a larger one fewer; the NFE falls monotonically enough to bisect for a target NFE.
  reorthogonalize: the ablation of `vde`.
  """
  return VDEAdaptive(tolerance=_check_float("tolerance", tolerance),
                     stable_step=_check_int("stable_step", stable_step, 1),
                     reorthogonalize=_check_bool("reorthogonalize", reorthogonalize))


def interval_change(error: jax.Array, tolerance: jax.Array) -> jax.Array:
  """How the residual moves the interval (int32): -1 when error > tolerance, +1 when
  error < tolerance / 2, 0 in between (a dead band, so that a steady error holds the interval)."""
  return jnp.where(error > tolerance, -1, jnp.where(error < tolerance / 2, 1, 0)).astype(jnp.int32)


class _ScheduleState(NamedTuple):
  vde: _VDEState
  next_full: jax.Array    # int32: the step of the next full evaluation after the warm-up
  interval: jax.Array     # int32: the last interval chosen
  nfe: jax.Array          # int32: full evaluations so far
  last_step: jax.Array    # int32: num_steps - 1


class _ScheduledVDE(_VDEMixin):
  """VDE whose every full evaluation after the warm-up measures the residual, the relative error
  ||v_hat - v|| / ||v|| (`vde.relative_error`, over the batch and the branches) that the estimate
  v_hat of a skipped step (extrapolated alpha and beta, the last u, recomposed at the current x) would
  have had against the velocity v just computed, and sets the interval to the next full evaluation
  from it (`next_interval`, int32 >= 1). Steps i <= stable_step and the last step are always
  evaluated; the warm-up's last evaluation (i = stable_step) has no residual yet (its anchors are not
  both kept) and uses a change of 0."""

  def decide(self, net, state, i, last, x, t):
    return (i <= self.stable_step) | last | (i >= state.next_full), state, None

  def evaluate(self, net, state, aux, i, x, t):
    v_hat_K, _ = _VDEMixin.estimate(self, net, state.vde, aux, i, x, t)
    v_K, vde_state = _VDEMixin.evaluate(self, net, state.vde, aux, i, x, t)
    change = jnp.where(i > self.stable_step,
                       interval_change(vde_math.relative_error(v_hat_K, v_K), self.tolerance), 0)
    state = state._replace(vde=vde_state, nfe=state.nfe + 1)
    interval = self.next_interval(state, change, i)
    return v_K, state._replace(interval=interval, next_full=i + interval)

  def estimate(self, net, state, aux, i, x, t):
    v_K, _ = _VDEMixin.estimate(self, net, state.vde, aux, i, x, t)
    return v_K, state

  def run(self, net, x_T, num_steps, shift):
    vde_math.full_step_indices(num_steps, self.stable_step, 1)   # stable_step < num_steps
    state = _ScheduleState(self.init(net, x_T), jnp.int32(0), jnp.int32(0), jnp.int32(0),
                           jnp.int32(num_steps - 1))
    return _run_dynamic(net, self, state, x_T, flow.time_grid(num_steps, shift=shift))


@flax.struct.dataclass
class VDEResidual(_ScheduledVDE):
  """VDE with the residual rule (see `vde_residual`)."""
  tolerance: jax.Array
  stable_step: int = flax.struct.field(pytree_node=False)
  interval: int = flax.struct.field(pytree_node=False)
  reorthogonalize: bool = flax.struct.field(pytree_node=False, default=False)

  def next_interval(self, state, change, i):
    previous = jnp.where(i > self.stable_step, state.interval, self.interval)
    return jnp.maximum(previous + change, 1)


def vde_residual(tolerance: float, stable_step: int = 6, interval: int = 3, *,
                 reorthogonalize: bool = False) -> VDEResidual:
  """VDE whose interval follows the residual of its own estimate (our rule (b), issue 17).

  Every step i <= stable_step and the last step are evaluated. The warm-up's last evaluation schedules
  the next one `interval` steps later (as `vde`'s fixed schedule); at each later full evaluation the
  residual r = ||v_hat - v|| / ||v|| of the estimate that a skipped step would have made there (see
  `_ScheduledVDE`) moves the interval by `interval_change(r, tolerance)`:
      interval <- max(1, interval + (+1 if r < tolerance / 2, -1 if r > tolerance, else 0)),
  and the next full evaluation comes `interval` steps later. tolerance 0 shrinks the interval by one
  per evaluation down to 1; a huge one lengthens it by one per evaluation.
  reorthogonalize: the ablation of `vde`.
  """
  return VDEResidual(tolerance=_check_float("tolerance", tolerance),
                     stable_step=_check_int("stable_step", stable_step, 1),
                     interval=_check_int("interval", interval, 1),
                     reorthogonalize=_check_bool("reorthogonalize", reorthogonalize))


@flax.struct.dataclass
class VDEBudget(_ScheduledVDE):
  """VDE with the budget-aware rule (see `vde_budget`)."""
  tolerance: jax.Array
  budget: int = flax.struct.field(pytree_node=False)
  stable_step: int = flax.struct.field(pytree_node=False)
  reorthogonalize: bool = flax.struct.field(pytree_node=False, default=False)

  def next_interval(self, state, change, i):
    remaining = self.budget - state.nfe            # evaluations left, the forced last step included
    steps = state.last_step - i                    # steps left after this one
    safe = jnp.maximum(remaining, 1)
    spread = (2 * steps + safe) // (2 * safe)      # steps / remaining, rounded half up
    return jnp.where(remaining <= 1, jnp.maximum(steps, 1), jnp.maximum(spread + change, 1))

  def run(self, net, x_T, num_steps, shift):
    if self.budget > num_steps:
      raise ValueError(f"budget must be <= num_steps = {num_steps}; got {self.budget}")
    return super().run(net, x_T, num_steps, shift)


def vde_budget(budget: int, tolerance: float, stable_step: int = 6, *,
               reorthogonalize: bool = False) -> VDEBudget:
  """VDE spending a total budget of full evaluations, nudged by the residual (our rule (c), issue 17).

  Every step i <= stable_step and the last step are evaluated. After the full evaluation at step i,
  with n evaluations made so far, R = budget - n left (the forced last step included) and
  S = num_steps - 1 - i steps to go, the next full evaluation comes after
      interval = S                                  if R <= 1 (only the last step is left),
      interval = max(1, round(S / R) + change)      otherwise,
  where round is half up and change = `interval_change(r, tolerance)` in {-1, 0, +1} of the residual r
  (see `vde_residual`; 0 at the warm-up's last evaluation). So the NFE never exceeds the budget, and
  with change 0 the evaluations are spread evenly: 50 steps, stable_step 6 and budget 16 / 18 / 22
  give intervals of about 5 / 4 / 3, the fixed schedules' NFE. tolerance trades the residual's pull:
  0 always shortens (-1), which spends exactly the budget (each interval then leaves at least as many
  steps as evaluations), a huge one always lengthens (+1). budget in [stable_step + 2, num_steps].
  reorthogonalize: the ablation of `vde`.
  """
  stable_step = _check_int("stable_step", stable_step, 1)
  return VDEBudget(tolerance=_check_float("tolerance", tolerance),
                   budget=_check_int("budget (full evaluations, warm-up and last step included)",
                                     budget, stable_step + 2),
                   stable_step=stable_step,
                   reorthogonalize=_check_bool("reorthogonalize", reorthogonalize))


def teacache_update(acc, d, coefficients, threshold, forced):
  """One step of TeaCache's accumulator (arXiv 2411.19108, Sec. 3.3; its public code).

  acc += polyval(coefficients, d) (coefficients highest degree first, as np.poly1d); the step is
  computed, and acc reset to 0, when forced or acc >= threshold. Returns (compute, acc).
  """
  acc = acc + jnp.polyval(jnp.asarray(coefficients, jnp.float32), d)
  compute = forced | (acc >= threshold)
  return compute, jnp.where(compute, 0.0, acc)


class _ResidualState(NamedTuple):
  acc: jax.Array          # [K]: one accumulator per branch
  signal_prev: jax.Array  # [K * B, ...]
  residual: Any           # blocks(h) - h of each branch's last full evaluation, rows [K * B, ...]


def _residual_state(net, x_T, signal: bool) -> _ResidualState:
  h, c = jax.eval_shape(net.embed, x_T, _t_batch(1.0, x_T))
  zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32 if signal else a.dtype),
                                    tree)
  m = zeros(jax.eval_shape(net.signal, h, c)) if signal else jnp.float32(0)
  residual = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(net.blocks, h, c))
  return _ResidualState(jnp.zeros((_num_branches(h, x_T),), jnp.float32), m, residual)


class _ResidualMixin:
  """Full evaluation and residual reuse (TeaCache, FORA): embed and head run at every step."""

  def evaluate_branches(self, net, computed: tuple[bool, ...], state, aux, i, x, t):
    """The blocks run on the rows of the branches marked in `computed` (static bools [K]) and renew
    their residual; the other branches add their cached residual to h. Returns (v [K, B, ...], state)."""
    h, c = aux
    num_branches = len(computed)
    branches = tuple(k for k, on in enumerate(computed) if on)
    reused = jax.tree.map(jnp.add, h, state.residual)
    if not branches:
      return net.head(reused, c), state
    if len(branches) == num_branches:
      h_in, c_in = h, c
    else:
      h_in, c_in = _branch_rows((h, c), branches, num_branches)
    h_out = net.blocks(h_in, c_in)
    residual = jax.tree.map(jnp.subtract, h_out, h_in)
    if len(branches) < num_branches:
      h_out = _set_branch_rows(reused, h_out, branches, num_branches)
      residual = _set_branch_rows(state.residual, residual, branches, num_branches)
    return net.head(h_out, c), state._replace(residual=residual)

  def evaluate(self, net, state, aux, i, x, t):
    computed = (True,) * _num_branches(aux[0], x)
    return self.evaluate_branches(net, computed, state, aux, i, x, t)

  def estimate(self, net, state, aux, i, x, t):
    computed = (False,) * _num_branches(aux[0], x)
    return self.evaluate_branches(net, computed, state, aux, i, x, t)


@flax.struct.dataclass
class TeaCache(_ResidualMixin):
  """TeaCache (see `teacache`)."""
  threshold: jax.Array
  coefficients: jax.Array

  def decide(self, net, state, i, last, x, t):
    h, c = net.embed(x, _t_batch(t, x))
    m = net.signal(h, c).astype(jnp.float32)
    num_branches = _num_branches(h, x)
    per_branch = lambda a: jnp.mean(jnp.abs(a.reshape(num_branches, -1)), axis=1)
    first = i == 0
    # The first step has no previous signal; it is forced, so its distance is never used.
    d_K = jnp.where(first, 0.0, per_branch(m - state.signal_prev)
                    / jnp.where(first, 1.0, per_branch(state.signal_prev)))
    compute_K, acc_K = teacache_update(state.acc, d_K, self.coefficients, self.threshold, first | last)
    return compute_K, state._replace(acc=acc_K, signal_prev=m), (h, c)

  def run(self, net, x_T, num_steps, shift):
    return _run_dynamic(net, self, _residual_state(net, x_T, signal=True), x_T,
                        flow.time_grid(num_steps, shift=shift))


def teacache(threshold: float, coefficients=(1.0, 0.0)) -> TeaCache:
  """TeaCache (arXiv 2411.19108): reuse the blocks' residual while the accumulated, rescaled change
  of the first block's modulated input stays below threshold.

  Each branch k (conditional, unconditional) decides on its own, with its own accumulator, as the
  public CFG code (TeaCache4Wan2.1's teacache_forward: accumulated_rel_l1_distance_even / _odd):
  d_k = mean|m_k - m_k,prev| / mean|m_k,prev| over branch k's rows of the signal m at the current and
  previous step; the accumulator and the forced first and last steps are `teacache_update`. A branch
  that computes runs the blocks on its rows alone (1 / K of an NFE). coefficients: the rescaling
  polynomial, highest degree first, fitted per model by `python -m flowrl.cache.calibrate`
  ((1, 0): d itself).
  """
  coefficients = np.asarray(coefficients, np.float32)
  if coefficients.ndim != 1 or coefficients.size < 1:
    raise ValueError(f"coefficients must be a 1-D sequence of floats (highest degree first); "
                     f"got shape {coefficients.shape}")
  return TeaCache(threshold=_check_float("threshold", threshold),
                  coefficients=jnp.asarray(coefficients))


@flax.struct.dataclass
class Fora(_ResidualMixin):
  """FORA-style residual reuse on a fixed period (see `fora`)."""
  n: int = flax.struct.field(pytree_node=False)

  def decide(self, net, state, i, last, x, t):
    return None, state, net.embed(x, _t_batch(t, x))

  def run(self, net, x_T, num_steps, shift):
    pattern = tuple(i % self.n == 0 for i in range(num_steps))
    return _run_static(net, self, _residual_state(net, x_T, signal=False), x_T,
                       flow.time_grid(num_steps, shift=shift), pattern)


def fora(n: int) -> Fora:
  """FORA (arXiv 2407.01425)-style: the blocks run every n-th step, other steps reuse their residual.

  FORA caches each layer's attention and MLP outputs; at our cut the whole blocks' residual is reused.
  """
  return Fora(n=_check_int("n (the refresh period)", n, 1))


def easycache_update(err, k, input_change, output_scale, tau, forced):
  """One step of EasyCache's accumulator (arXiv 2507.02860, Sec. 3; its public code).

  err += k * input_change / output_scale; the step is computed, and err reset to 0, when forced or
  err >= tau. Returns (compute, err).
  """
  err = err + k * input_change / output_scale
  compute = forced | (err >= tau)
  return compute, jnp.where(compute, 0.0, err)


class _EasyCacheState(NamedTuple):
  err: jax.Array
  k: jax.Array            # the conditional branch's output change / input change between the last
                          # two full evaluations
  x_prev: jax.Array       # the previous step's input
  x_full: jax.Array       # the input and output of the last full evaluation
  v_full: jax.Array       # [K, B, ...]


@flax.struct.dataclass
class EasyCache:
  """EasyCache (see `easycache`)."""
  tau: jax.Array
  warmup: int = flax.struct.field(pytree_node=False)

  def decide(self, net, state, i, last, x, t):
    s = state
    first = i == 0
    # The first step is in the warm-up, so its (undefined) input change is never used.
    change = jnp.where(first, 0.0, _mean_abs(x - s.x_prev))
    scale = jnp.where(first, 1.0, _mean_abs(s.v_full[0]))
    compute, err = easycache_update(s.err, s.k, change, scale, self.tau, (i < self.warmup) | last)
    return compute, s._replace(err=err, x_prev=x), None

  def evaluate(self, net, state, aux, i, x, t):
    v_K = network_velocity(net, x, _t_batch(t, x))
    # The first evaluation has nothing to compare with (x_full = x there: 0 / 0).
    k = jnp.where(i == 0, state.k, _mean_abs(v_K[0] - state.v_full[0]) / _mean_abs(x - state.x_full))
    return v_K, state._replace(k=k, x_full=x, v_full=v_K)

  def estimate(self, net, state, aux, i, x, t):
    # The cache delta = v_full - x_full: the output moves with the input, v_hat = x_t + delta.
    return x + (state.v_full - state.x_full), state

  def run(self, net, x_T, num_steps, shift):
    if self.warmup >= num_steps:
      raise ValueError(f"warmup must be < num_steps = {num_steps}; got {self.warmup}")
    v = _velocity_shape(net, x_T)
    state = _EasyCacheState(jnp.float32(0), jnp.float32(0), x_T, x_T, jnp.zeros(v.shape, v.dtype))
    return _run_dynamic(net, self, state, x_T, flow.time_grid(num_steps, shift=shift))


def easycache(tau: float, warmup: int = 10) -> EasyCache:
  """EasyCache (arXiv 2507.02860): reuse delta = v - x of the last full evaluation while the
  accumulated predicted output change stays below tau.

  The first `warmup` steps and the last step are evaluated; at a full evaluation
  k = mean|v_c - v_c,full| / mean|x - x_full| (the previous full evaluation's input and output);
  at each later step err += k mean|x_t - x_prev| / mean|v_c,full| (`easycache_update`); err < tau
  reuses v = x_t + delta, each branch with its own delta. v_c is the conditional branch (the only one
  with K = 1): as in the public code, k, the output scale and so the decision, shared by both
  branches, come from the conditional pass alone (EasyCache4Wan2.1/easycache_generate.py,
  easycache_forward: the "even" calls; github.com/H-EmbodVis/EasyCache).
  warmup: the public code's ret_steps, 10 of Wan2.1's 50 steps (ret_steps = 10 * 2 calls, cond and
  uncond) and 5 for HunyuanVideo; >= 2, so that k exists before the first decision.
  """
  return EasyCache(tau=_check_float("tau", tau), warmup=_check_int("warmup", warmup, 2))


Policy = Full | VDE | VDEAdaptive | VDEResidual | VDEBudget | TeaCache | Fora | EasyCache
# Policy names for `sample(..., policy="vde")`: the constructors, called with their defaults.
POLICIES = {"full": full, "fewer_steps": fewer_steps, "vde": vde, "vde_adaptive": vde_adaptive,
            "vde_residual": vde_residual, "vde_budget": vde_budget, "teacache": teacache,
            "fora": fora, "easycache": easycache}


def make_policy(policy: Policy | str) -> Policy:
  """A policy, or its name in POLICIES built with the constructor's defaults; ValueError for an
  unknown name or one whose constructor needs arguments (naming them)."""
  if not isinstance(policy, str):
    if not hasattr(policy, "run"):
      raise TypeError(f"policy must be a name in {sorted(POLICIES)} or a policy object (e.g. "
                      f"sampling.vde()), got {type(policy).__name__}")
    return policy
  if policy not in POLICIES:
    raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(sorted(POLICIES))} "
                     "or a policy object")
  make = POLICIES[policy]
  required = [n for n, p in inspect.signature(make).parameters.items()
              if p.default is inspect.Parameter.empty]
  if required:
    raise ValueError(f"policy {policy!r} has no default {', '.join(required)}: pass "
                     f"sampling.{make.__name__}({', '.join(f'{n}=...' for n in required)})")
  return make()


def sample_network(net: Network, x_T: jax.Array, num_steps: int, policy: Policy, *,
                   shift: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Integrates from x_T [B, ...] at t = 1 to t = 0 on `flow.time_grid(num_steps, shift)`.

  Returns (x0 [B, ...], nfe): nfe float32, the network evaluations made (one decision per batch; a
  branch evaluated alone counts 1 / K).
  """
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
    raise ValueError(f"num_steps must be an int >= 2; got {num_steps!r}")
  return policy.run(net, x_T, int(num_steps), shift)


def _check_inputs(model, params, x_T, y) -> None:
  """x_T against the DiT's patches and input channels, y against the batch and the classes."""
  p = model.patch_size
  if jnp.ndim(x_T) != 4:
    raise ValueError(f"x_T must be [B, H, W, C] noise, got shape {jnp.shape(x_T)}")
  b, h, w, c = x_T.shape
  rows = params["patch_embed"]["kernel"].shape[0]       # p * p * C of the trained model
  if h % p or w % p or c * p * p != rows:
    raise ValueError(f"x_T of shape {x_T.shape} does not fit the model: it takes [B, H, W, "
                     f"{rows // (p * p)}] with H and W multiples of its patch size {p}")
  if not model.num_classes:
    if y is not None:
      raise ValueError("y was given, but the model is unconditional (num_classes = 0)")
    return
  if y is None:
    raise ValueError(f"y (int labels [B] in [0, {model.num_classes})) is required by a "
                     "class-conditional model")
  if jnp.shape(y) != (b,) or not jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer):
    raise ValueError(f"y must be int labels [B] = [{b}] (one per x_T sample), got "
                     f"{jnp.asarray(y).dtype} {jnp.shape(y)}")
  try:
    values = np.asarray(y)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return        # traced: the range check needs values
  if values.min() < 0 or values.max() >= model.num_classes:
    raise ValueError(f"y must lie in [0, {model.num_classes}) (the model's classes), got values "
                     f"in [{values.min()}, {values.max()}]")


def sample(model, params, x_T: jax.Array, num_steps: int, policy: Policy | str, *,
           y: jax.Array | None = None, cfg_scale: float = 1.0, shift: float = 1.0,
           per_sample: bool = False) -> tuple[jax.Array, jax.Array]:
  """Samples a `core.nn.DiT` (`dit_network`) from x_T [B, H, W, C] with a caching policy.

  policy: a policy object (`vde(...)`, `teacache(...)`, ...) or a name of POLICIES (`make_policy`).
  y: int labels [B] in [0, model.num_classes) for a class-conditional model, else None.
  per_sample: decide for each sample alone (a `lax.map` over batches of one, as the methods' public
  code runs one generation at a time) instead of once per batch.
  Returns (x0 [B, H, W, C], nfe_B float32 [B]).
  """
  policy = make_policy(policy)
  _check_inputs(model, params, x_T, y)
  make_net = lambda x, labels: dit_network(model, params, x.shape[1:], y=labels, cfg_scale=cfg_scale)
  if per_sample:
    return sample_each(make_net, x_T, num_steps, policy, y=y, shift=shift)
  x, nfe = sample_network(make_net(x_T, y), x_T, num_steps, policy, shift=shift)
  return x, jnp.full((x_T.shape[0],), nfe)


def sample_each(make_net: Callable[[jax.Array, Any], Network], x_T: jax.Array, num_steps: int,
                policy: Policy | str, *, y: Any = None, shift: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """`sample_network` for each sample of x_T [B, ...] alone, so that every policy decides per sample
  (the methods' public code generates one image at a time).

  make_net(x [1, ...], y_1) -> the Network of a batch of one; y: the batch's condition (a pytree of
  [B, ...] leaves, sliced per sample) or None. Returns (x0 [B, ...], nfe_B float32 [B]).
  """
  policy = make_policy(policy)

  def one(args):
    x, labels = args
    labels = None if y is None else jax.tree.map(lambda a: a[None], labels)
    x0, nfe = sample_network(make_net(x[None], labels), x[None], num_steps, policy, shift=shift)
    return x0[0], nfe

  # lax.map is a scan: unlike vmap it keeps each sample's lax.cond a real branch.
  return jax.lax.map(one, (x_T, jnp.zeros(x_T.shape[:1], jnp.int32) if y is None else y))
