"""The SDE sampler family for flow-matching RL, with per-step Gaussian log-probabilities.

Convention (core/flow.py, design/precise.md): t = sigma in [0, 1], t = 1 is noise, x_t = (1 - t) x0 + t eps,
v = eps - x0; a step goes from t to s < t, dt = s - t < 0, and from (x, v): x0_hat = x - t v,
eps_hat = x + (1 - t) v. Every stochastic step is a Gaussian transition x_s = mean + std * z, z ~ N(0, I):

  "ode"           Euler: mean = x + v dt, std = 0.
  "flow_grpo"     Flow-GRPO (arXiv 2505.05470, Eq. 9): sigma_t = a sqrt(t / (1 - t)),
                  mean = x (1 + sigma_t^2 dt / (2t)) + v dt (1 + sigma_t^2 (1 - t) / (2t)),
                  std = sigma_t sqrt(-dt).
  "dance"         DanceGRPO (arXiv 2505.07818): score = -(x - (1 - t) x0_hat) / t^2,
                  mean = x + v dt - eta^2 score dt / 2, std = eta sqrt(t - s).
  "cps"           coefficients-preserving sampling (arXiv 2509.05952):
                  mean = (1 - s) x0_hat + s cos(eta pi / 2) eps_hat, std = s sin(eta pi / 2).
  "precise"       Precise (arXiv 2605.23522): r = s (1 - t) / (t (1 - s)), std^2 = s^2 (1 - r^(eta^2)),
                  mean = (1 - s) x0_hat + sqrt(s^2 - std^2) eps_hat; std >= 1e-6.
  "dance_precise" Precise with DanceGRPO's noise schedule: rho = exp(-eta^2 (1/s - 1/t) / 2),
                  std = s sqrt(1 - rho^2), the same mean; std >= 1e-6.

`sample` runs a whole trajectory with one of them (stochastic inside an SDE window, Euler elsewhere) and
returns what GRPO needs.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from core import flow

METHODS = ("ode", "flow_grpo", "dance", "cps", "precise", "dance_precise")
# Precise's floor on the std (its public code): at s = 0 the exact transition is deterministic.
MIN_STD = 1e-6
# The methods whose step to s = 0 is deterministic (std 0, or MIN_STD for Precise).
DETERMINISTIC_AT_ZERO = ("ode", "cps", "precise", "dance_precise")


def _concrete(x) -> np.ndarray | None:
  """x as numpy when it is a concrete value, None when it is traced (then value checks are skipped)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def check_step_args(method: str, t, s, eta) -> None:
  """Raises ValueError for an unknown method, s >= t, times outside [0, 1] or a negative eta.

  Value checks run only on concrete values (under jit they are skipped).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}; got {method!r}")
  t_np, s_np, eta_np = _concrete(t), _concrete(s), _concrete(eta)
  if t_np is not None and s_np is not None:
    if np.any(s_np >= t_np):
      raise ValueError(f"a step needs s < t (t -> s toward data); got t={t_np}, s={s_np}")
    if np.any(s_np < 0) or np.any(t_np > 1):
      raise ValueError(f"times must lie in [0, 1]; got t={t_np}, s={s_np}")
  if eta_np is not None and np.any(eta_np < 0):
    raise ValueError(f"eta (the noise level) must be >= 0; got {eta_np}")


def sde_step(method: str, x: jax.Array, v: jax.Array, t, s, noise: jax.Array, eta):
  """One transition t -> s of `method` (see the module docstring).

  Args:
    method: one of METHODS.
    x: the state at t, [B, ...]; v: the velocity at (x, t), [B, ...].
    t, s: scalars or [B] with 0 <= s < t <= 1.
    noise: standard normal, shaped like x.
    eta: the noise level (Flow-GRPO's a; ignored by "ode"), >= 0. Flow-GRPO's sigma_t at t = 1 uses s
      in the denominator (sqrt(1 / (1 - s))), as its public code does with the next grid point.
  Returns:
    (x_next, mean, std): x_next = mean + std * noise exactly; mean [B, ...]; std broadcastable to x
    (a scalar, or [B, 1, ...] for per-example times). "ode" has std 0 (no density: do not take
    gaussian_log_prob of it); "cps" has std 0 at s = 0.
  """
  check_step_args(method, t, s, eta)
  if v.shape != x.shape or noise.shape != x.shape:
    raise ValueError(f"x {x.shape}, v {v.shape} and noise {noise.shape} must share a shape")
  t_b, s_b = flow.time_like(t, x), flow.time_like(s, x)
  dt = s_b - t_b
  if method == "ode":
    mean, std = x + v * dt, jnp.zeros_like(t_b)
  elif method in ("flow_grpo", "dance"):
    x0_hat = flow.x0_from_velocity(x, v, t)
    score = -(x - (1 - t_b) * x0_hat) / t_b ** 2
    if method == "flow_grpo":
      # At t = 1, 1 / (1 - t) is infinite; Flow-GRPO's code puts the next grid point there instead.
      sigma = eta * jnp.sqrt(t_b / (1 - jnp.where(t_b == 1, s_b, t_b)))
      std = sigma * jnp.sqrt(-dt)
    else:
      std = eta * jnp.sqrt(-dt)
    # Both are Euler-Maruyama on the reverse SDE dx = (v - std^2/(-2 dt) score) dt + ...: the drift
    # correction is std^2 score / 2, which for Flow-GRPO is its Eq. 9 written out.
    mean = x + v * dt + 0.5 * std ** 2 * score
  else:
    x0_hat, eps_hat = flow.x0_from_velocity(x, v, t), flow.eps_from_velocity(x, v, t)
    if method == "cps":
      std = s_b * jnp.sin(eta * jnp.pi / 2)
      eps_coef = s_b * jnp.cos(eta * jnp.pi / 2)
    else:
      if method == "precise":
        # r^(eta^2) is the decay of the OU bridge for a frozen x0_hat (arXiv 2605.23522, Sec. 3).
        keep = (s_b * (1 - t_b) / (t_b * (1 - s_b))) ** (eta ** 2)
      else:
        safe_s = jnp.where(s_b > 0, s_b, 1.0)   # s = 0: rho's value is irrelevant (multiplied by s)
        keep = jnp.exp(-(eta ** 2) * (1 / safe_s - 1 / t_b)) * (s_b > 0)   # rho^2
      std = jnp.maximum(s_b * jnp.sqrt(1 - keep), MIN_STD)
      # sqrt(s^2 - std^2) written as s sqrt(keep): exact, and never the sqrt of a rounding-negative.
      eps_coef = s_b * jnp.sqrt(keep)
    mean = (1 - s_b) * x0_hat + eps_coef * eps_hat
  mean = mean.astype(x.dtype)
  return (mean + std * noise).astype(x.dtype), mean, std


def mean_velocity_gain(method: str, t, s, eta, like: jax.Array) -> jax.Array:
  """|d mean / d v| of `method`'s step t -> s: every step's mean is affine in v with one scalar
  coefficient (Euler: dt; Flow-GRPO and Dance: dt - std^2 (1 - t) / (2 t); CPS and Precise:
  -t (1 - s) + (1 - t) sqrt(s^2 - std^2)), read off `sde_step` by a JVP in the direction of ones.
  Precise's ratio normalisation divides each step's loss by it (its public code's `grpo_guard`).

  like: an array shaped like the state ([B, ...]); returns |coefficient| broadcast to it.
  """
  zeros, ones = jnp.zeros_like(like), jnp.ones_like(like)
  _, gain = jax.jvp(lambda v: sde_step(method, zeros, v, t, s, zeros, eta)[1], (zeros,), (ones,))
  return jnp.abs(gain)


def gaussian_log_prob(x_next: jax.Array, mean: jax.Array, std) -> jax.Array:
  """log N(x_next; mean, std^2 I) averaged (not summed) over the non-batch dims, in float32: [B].

  Averaging follows the public Flow-GRPO / DanceGRPO / Precise code. std must be > 0 (scalar or
  broadcastable to x_next); a deterministic step (std = 0) has no density.
  """
  if x_next.shape != mean.shape:
    raise ValueError(f"x_next {x_next.shape} and mean {mean.shape} must share a shape")
  x_next, mean = x_next.astype(jnp.float32), mean.astype(jnp.float32)
  std = jnp.broadcast_to(jnp.asarray(std, jnp.float32), x_next.shape)
  logp = -((x_next - mean) ** 2) / (2 * std ** 2) - jnp.log(std) - 0.5 * jnp.log(2 * jnp.pi)
  return logp.reshape(logp.shape[0], -1).mean(axis=1)


class Trajectory(NamedTuple):
  """A sampled trajectory over T steps on `times` [T + 1].

  xs: [T + 1, B, ...] the states, xs[0] the initial noise and xs[-1] = x0.
  means: [T, B, ...] the transition means; stds: [T, B] the per-example stds (0 on Euler steps).
  log_probs: [T, B] float32 log p(xs[k+1] | xs[k]) (gaussian_log_prob), 0 on Euler steps.
  sde_mask: bool [T], True on the stochastic steps.
  times: [T + 1]; x0: [B, ...] the final sample (= xs[-1]).
  """
  xs: jax.Array
  means: jax.Array
  stds: jax.Array
  log_probs: jax.Array
  sde_mask: jax.Array
  times: jax.Array
  x0: jax.Array


def window_mask(num_steps: int, sde_window=None) -> jax.Array:
  """bool [num_steps]: which steps are stochastic.

  sde_window: None = every step but the last (the step to t = 0 is deterministic for CPS and Precise,
    and Flow-GRPO trains on int(0.99 T) steps, which also leaves it out); (start, stop) step indices
    (stop exclusive, ints or traced scalars, e.g. a sliding window); or a bool array [num_steps].
  """
  idx = jnp.arange(num_steps)
  if sde_window is None:
    return idx < num_steps - 1
  if isinstance(sde_window, tuple):
    start, stop = sde_window
    return (idx >= start) & (idx < stop)
  mask = jnp.asarray(sde_window)
  if mask.shape != (num_steps,) or mask.dtype != jnp.bool_:
    raise ValueError(f"sde_window must be None, (start, stop) or a bool mask of shape ({num_steps},); "
                     f"got {mask.dtype} {mask.shape}")
  return mask


def trainable_steps(sde_mask: jax.Array) -> jax.Array:
  """bool [T]: the stochastic steps GRPO may train on, i.e. sde_mask without the last step (which
  the public pipelines sample but never train: they train the first int(0.99 T) steps)."""
  return sde_mask.at[-1].set(False)


def guided_velocity(velocity_fn: Callable[..., jax.Array], cond: Any = None, null_cond: Any = None,
                    cfg_scale=1.0) -> flow.VelocityFn:
  """(x, t_B) -> v from velocity_fn(x, t_B, cond); with CFG (core.flow.guided) when cfg_scale != 1."""
  if cfg_scale != 1.0:
    if null_cond is None:
      raise ValueError("classifier-free guidance (cfg_scale != 1) needs null_cond")
    return flow.guided(velocity_fn, cond, null_cond, cfg_scale)
  return lambda x, t: velocity_fn(x, t, cond)


def sample(velocity_fn: flow.VelocityFn, x_T: jax.Array, grid, key: jax.Array, *, method: str, eta,
           sde_window=None, sde_last_step: bool = False) -> Trajectory:
  """Samples one trajectory along `grid` with `method` on the SDE window and Euler elsewhere.

  Args:
    velocity_fn: (x [B, ...], t [B]) -> v (use `guided_velocity` for conditions and CFG).
    x_T: [B, ...] the state at grid[0] (noise when grid[0] = 1).
    grid: decreasing times [T + 1] (e.g. core.flow.time_grid(T, shift=...)).
    key: step k draws its noise from fold_in(key, k).
    method: one of METHODS ("ode" makes every step Euler).
    eta: the method's noise level.
    sde_window: see `window_mask`.
    sde_last_step: also sample the last step (to grid[-1]) with the SDE, as the public Flow-GRPO and
      Precise pipelines do for every sampler (Flow-GRPO's and Dance's samples then end noisy; CPS's
      and Precise's step there is deterministic anyway, so for them it is refused). It is not a
      training step (`trainable_steps`).
  Returns:
    Trajectory. With method "ode", or an empty window, x0 equals core.flow.euler_sample's.
  Raises:
    ValueError: bad method/eta/grid, or a window holding a step to t = 0 for a method whose step
      there is deterministic (no log-probability).
  """
  grid = flow.check_grid(grid)
  num_steps = grid.shape[0] - 1
  check_step_args(method, grid[:-1], grid[1:], eta)
  if sde_last_step and method in DETERMINISTIC_AT_ZERO:
    raise ValueError(f"sde_last_step: the step to t = 0 is deterministic for method={method!r}")
  mask = window_mask(num_steps, sde_window)
  if sde_last_step:
    mask = mask.at[-1].set(True)
  mask = mask & (method != "ode")
  grid_np, mask_np = _concrete(grid), _concrete(mask)
  if (method in DETERMINISTIC_AT_ZERO and grid_np is not None and mask_np is not None
      and np.any(mask_np & (grid_np[1:] == 0))):
    raise ValueError(f"sde_window includes the step to t = 0, which is deterministic for "
                     f"method={method!r}; end the window before the last step")
  batch = x_T.shape[0]

  def step(x, inputs):
    k, t, s, stochastic = inputs
    v = velocity_fn(x, jnp.full((batch,), t))
    noise = jax.random.normal(jax.random.fold_in(key, k), x.shape, x.dtype)
    _, mean_sde, std_sde = sde_step(method, x, v, t, s, noise, eta)
    mean = jnp.where(stochastic, mean_sde, flow.euler_step(x, v, t, s))
    std = jnp.where(stochastic, std_sde, 0.0)
    x_next = (mean + std * noise).astype(x.dtype)
    # std 1 off the window keeps the (discarded) log-density finite, and its gradient too.
    logp = jnp.where(stochastic, gaussian_log_prob(x_next, mean, jnp.where(stochastic, std, 1.0)), 0.0)
    return x_next, (x_next, mean, jnp.broadcast_to(std, (batch,)), logp)

  x0, (xs, means, stds, log_probs) = jax.lax.scan(
      step, x_T, (jnp.arange(num_steps), grid[:-1], grid[1:], mask))
  return Trajectory(xs=jnp.concatenate([x_T[None], xs]), means=means, stds=stds, log_probs=log_probs,
                    sde_mask=mask, times=grid, x0=x0)
