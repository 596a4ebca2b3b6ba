"""Rectified-flow math shared by every method: interpolant, times, loss, Euler sampling, CFG.

Convention (diffusers; see design/precise.md): t = sigma in [0, 1], t = 1 is pure noise,
    x_t = (1 - t) x0 + t eps,    v = dx_t/dt = eps - x0,
so x0 = x_t - t v and eps = x_t + (1 - t) v. A sampling step goes from t to s < t (dt = s - t < 0).
Rectified flow: Liu et al. arXiv 2209.03003; the SD3 training recipe: Esser et al. arXiv 2403.03206.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

TIME_KINDS = ("uniform", "logit_normal")

# Sampled times stay this far inside (0, 1) so that weights like 1 / t or 1 / (1 - t) stay finite.
T_EPS = 1e-5

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def time_like(t, x: jax.Array) -> jax.Array:
  """Reshapes a scalar or per-example time t [B] to broadcast against x [B, ...]."""
  t = jnp.asarray(t)
  if t.ndim == 0:
    return t
  if t.ndim != 1 or x.ndim == 0 or t.shape[0] != x.shape[0]:
    raise ValueError(f"t must be a scalar or have shape [B] matching the batch of x {x.shape}; "
                     f"got t of shape {t.shape}")
  return t.reshape(t.shape + (1,) * (x.ndim - 1))


def interpolate(x0: jax.Array, eps: jax.Array, t) -> jax.Array:
  """x_t = (1 - t) x0 + t eps for x0, eps [B, ...] and t scalar or [B]; returns [B, ...]."""
  t = time_like(t, x0)
  return (1 - t) * x0 + t * eps


def velocity_target(x0: jax.Array, eps: jax.Array) -> jax.Array:
  """The velocity d x_t / dt = eps - x0 that the model regresses; same shape as x0."""
  return eps - x0


def x0_from_velocity(x_t: jax.Array, v: jax.Array, t) -> jax.Array:
  """x0 = x_t - t v for x_t, v [B, ...] and t scalar or [B]; returns [B, ...]."""
  return x_t - time_like(t, x_t) * v


def eps_from_velocity(x_t: jax.Array, v: jax.Array, t) -> jax.Array:
  """eps = x_t + (1 - t) v for x_t, v [B, ...] and t scalar or [B]; returns [B, ...]."""
  return x_t + (1 - time_like(t, x_t)) * v


def time_shift(t, shift):
  """Shifts times toward noise: shift t / (1 + (shift - 1) t) (arXiv 2403.03206, Sec. 5.3.2).

  A bijection of [0, 1] fixing 0 and 1, increasing in t; shift = 1 is the identity, shift > 1 spends
  more time at high noise, and time_shift(., 1 / shift) is its inverse. Works on floats and arrays.
  """
  return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_pixels_or_tokens, *, base, base_shift=1.0):
  """Resolution-dependent shift base_shift * sqrt(n / base) for time_shift.

  SD3 (arXiv 2403.03206, Sec. 5.3.2) keeps the signal-to-noise ratio of x_t comparable across
  resolutions by shifting with sqrt(m / n), m and n the pixel (or token) counts of the target and
  reference resolutions: pass n = H * W and base = the reference count. PiD (arXiv 2605.23902) uses
  s = 6 sqrt(sqrt(H W) / 2048): pass n = sqrt(H W) (the side length), base = 2048, base_shift = 6.
  """
  return base_shift * (num_pixels_or_tokens / base) ** 0.5


def sample_time(key: jax.Array, batch: int, *, kind: str = "uniform", mean: float = 0.0,
                std: float = 1.0, shift: float = 1.0) -> jax.Array:
  """Training times t [batch] float32 in the open interval (0, 1).

  kind "uniform": t ~ U(0, 1); "logit_normal": logit(t) ~ N(mean, std^2)
  (arXiv 2403.03206, Sec. 3.1).
  The draw is then time-shifted by `shift` and clipped to [T_EPS, 1 - T_EPS].
  """
  if kind == "uniform":
    t = jax.random.uniform(key, (batch,), jnp.float32)
  elif kind == "logit_normal":
    t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), jnp.float32))
  else:
    raise ValueError(f"kind must be one of {TIME_KINDS}; got {kind!r}")
  return jnp.clip(time_shift(t, shift), T_EPS, 1 - T_EPS)


def time_grid(num_steps: int, *, shift: float = 1.0, t_max: float = 1.0,
              t_min: float = 0.0) -> jax.Array:
  """Sampling grid float32 [num_steps + 1], decreasing from t_max to t_min.

  Uniform in the unshifted time, then time-shifted: grid = time_shift(u, shift) with u uniform
  between time_shift(t_max, 1 / shift) and time_shift(t_min, 1 / shift), so the endpoints are
  exactly t_max and t_min for every shift. With t_max = 1, t_min = 0 this is the grid of diffusers'
  FlowMatchEulerDiscreteScheduler.
  """
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int; got {num_steps!r}")
  if not 0.0 <= t_min < t_max <= 1.0:
    raise ValueError(f"need 0 <= t_min < t_max <= 1; got t_min={t_min}, t_max={t_max}")
  if shift <= 0:
    raise ValueError(f"shift must be positive; got {shift}")
  u = np.linspace(time_shift(t_max, 1 / shift), time_shift(t_min, 1 / shift), num_steps + 1,
                  dtype=np.float64)
  grid = time_shift(u, shift)
  # The shift and its inverse may round in the last bit; pin the endpoints the caller asked for.
  grid[0], grid[-1] = t_max, t_min
  return jnp.asarray(grid, jnp.float32)


def flow_matching_loss(v_pred: jax.Array, x0: jax.Array, eps: jax.Array, *,
                       weight: jax.Array | None = None) -> jax.Array:
  """Scalar flow-matching loss: mean over all dims of (v_pred - (eps - x0))^2, in float32.

  Args:
    v_pred, x0, eps: [B, ...].
    weight: optional per-example weight [B]; the loss is then mean_b(weight_b * mse_b).
  """
  if v_pred.shape != x0.shape or eps.shape != x0.shape:
    raise ValueError(f"v_pred {v_pred.shape}, x0 {x0.shape} and eps {eps.shape} must share a shape")
  err = (v_pred.astype(jnp.float32) - velocity_target(x0, eps).astype(jnp.float32)) ** 2
  mse_B = err.reshape(err.shape[0], -1).mean(axis=1)
  if weight is None:
    return mse_B.mean()
  if jnp.shape(weight) != mse_B.shape:
    raise ValueError(f"weight must have shape [B] = {mse_B.shape}; got {jnp.shape(weight)}")
  return (weight * mse_B).mean()


def flow_matching_batch(key: jax.Array, x0: jax.Array, *, time_kind: str = "uniform",
                        shift: float = 1.0, mean: float = 0.0, std: float = 1.0):
  """Draws (t, eps) for clean data x0 [B, ...] and builds the regression problem.

  Returns:
    (x_t, t, target, eps): x_t [B, ...] the noisy input, t [B] float32 (see sample_time for
    time_kind/shift/mean/std), target = eps - x0 [B, ...], eps [B, ...] the noise drawn.
  """
  key_t, key_eps = jax.random.split(key)
  t = sample_time(key_t, x0.shape[0], kind=time_kind, mean=mean, std=std, shift=shift)
  eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
  return interpolate(x0, eps, t).astype(x0.dtype), t, velocity_target(x0, eps), eps


def check_grid(grid) -> jax.Array:
  """grid as a float32 [num_steps + 1] array; ValueError unless 1-D with at least two times."""
  grid = jnp.asarray(grid, jnp.float32)
  if grid.ndim != 1 or grid.shape[0] < 2:
    raise ValueError(f"grid must have shape [num_steps + 1] with num_steps >= 1; got {grid.shape}")
  return grid


def euler_step(x: jax.Array, v: jax.Array, t, s) -> jax.Array:
  """One Euler step of dx/dt = v from time t to s: x_s = x_t + (s - t) v, in x's dtype."""
  return (x + (s - t) * v).astype(x.dtype)


def euler_sample(velocity_fn: VelocityFn, x_T: jax.Array, grid, *, return_trajectory: bool = False):
  """Integrates dx/dt = velocity_fn(x, t_B) with Euler steps x_s = x_t + (s - t) v along the grid.

  Args:
    velocity_fn: (x [B, ...], t [B]) -> v [B, ...].
    x_T: the state at grid[0], [B, ...] (pure noise when grid[0] = 1).
    grid: times [num_steps + 1] (array or sequence; a jnp array may be traced under jit).
    return_trajectory: also return every state, x_T included.

  Returns:
    x at grid[-1], [B, ...]; with return_trajectory, (x, trajectory [num_steps + 1, B, ...]).
  """
  grid = check_grid(grid)
  batch = x_T.shape[0]

  def step(x, t_s):
    t, s = t_s
    x = euler_step(x, velocity_fn(x, jnp.full((batch,), t)), t, s)
    return x, x if return_trajectory else None

  x, states = jax.lax.scan(step, x_T, (grid[:-1], grid[1:]))
  if return_trajectory:
    return x, jnp.concatenate([x_T[None], states], axis=0)
  return x


def cfg_velocity(velocity_fn: Callable[..., jax.Array], x: jax.Array, t, cond: Any, null_cond: Any,
                 scale) -> jax.Array:
  """Classifier-free guidance v_u + scale (v_c - v_u) (arXiv 2207.12598, Eq. 6 with scale = 1 + w).

  Evaluates the conditional and unconditional velocities in ONE call of
  velocity_fn(x2 [2B, ...], t2 [2B], cond2), the batch being [conditional; unconditional].

  Args:
    velocity_fn: (x, t, cond) -> v.
    x: [B, ...]; t: scalar or [B].
    cond: a pytree of [B, ...] arrays (labels [B], text embeddings [B, L, D], ...).
    null_cond: the unconditional input, a pytree like cond whose leaves broadcast to cond's
      (e.g. a null label id, or a null embedding [1, L, D]).
    scale: guidance scale; 1 gives exactly v_c, 0 exactly v_u.
  """
  batch = x.shape[0]
  t_B = jnp.broadcast_to(jnp.asarray(t), (batch,))
  cond2 = jax.tree.map(
      lambda c, n: jnp.concatenate([c, jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape)]),
      cond, null_cond)
  v2 = velocity_fn(jnp.concatenate([x, x]), jnp.concatenate([t_B, t_B]), cond2)
  return cfg_mix(v2[:batch], v2[batch:], scale)


def cfg_mix(v_c: jax.Array, v_u: jax.Array, scale) -> jax.Array:
  """v_u + scale (v_c - v_u), written as a convex-style mix so that scale 1 and 0 return v_c and v_u
  bit for bit."""
  return scale * v_c + (1 - scale) * v_u


def guided(velocity_fn: Callable[..., jax.Array], cond: Any, null_cond: Any, scale) -> VelocityFn:
  """Closes cfg_velocity over (cond, null_cond, scale): returns (x, t) -> v for euler_sample."""
  return lambda x, t: cfg_velocity(velocity_fn, x, t, cond, null_cond, scale)


def drop_labels(key: jax.Array, labels: jax.Array, drop_prob: float, null_id: int) -> jax.Array:
  """Replaces each label by null_id independently with probability drop_prob (CFG training).

  labels: integer array of any shape (typically [B]); returns the same shape and dtype.
  """
  drop = jax.random.bernoulli(key, drop_prob, labels.shape)
  return jnp.where(drop, jnp.asarray(null_id, labels.dtype), labels)


def dm_gradient(x0: jax.Array, x0_real: jax.Array, x0_fake: jax.Array) -> jax.Array:
  """Distribution matching's generator gradient (DMD2, arXiv 2405.14867 Eq. 2; OSEDiff's VSD, arXiv
  2406.08177 Eq. 7): (x0_fake - x0_real) / mean|x0 - x0_real| per example, computed in float64
  where JAX has it (jax_enable_x64; float32 otherwise) with NaN/inf zeroed; in x0's dtype [B, ...]."""
  wide = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  x0w, real, fake = (a.astype(wide) for a in (x0, x0_real, x0_fake))
  norm = jnp.abs(x0w - real).reshape(x0.shape[0], -1).mean(axis=1)
  grad = (fake - real) / norm.reshape((-1,) + (1,) * (x0.ndim - 1))
  return jnp.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0).astype(x0.dtype)


def dm_loss(x0: jax.Array, grad: jax.Array) -> jax.Array:
  """1/2 mean (x0 - stop_gradient(x0 - grad))^2: its gradient w.r.t. x0 is grad / x0.size."""
  return 0.5 * jnp.mean((x0 - jax.lax.stop_gradient(x0 - grad)) ** 2)
