"""VDE: velocity decompose-and-estimate (arXiv 2605.23381), the math of one sample's velocity.

A velocity is split relative to the current state x (norms over the whole sample):
    v = alpha x + beta ||x|| u,   alpha = <v, x> / ||x||^2,   beta = ||r|| / ||x||,   u = r / ||r||,
with r = v - alpha x the part orthogonal to x. alpha and beta change smoothly along a trajectory and u
slowly, so a skipped step re-estimates v from the CURRENT x with alpha, beta extrapolated linearly in t
through the last two anchors and the last u. The schedules of full evaluations live here too; the
sampler that uses them is `flowrl.cache.sampling`.
"""
import jax
import jax.numpy as jnp
import numpy as np

# ||r|| below this (relative to ||v||, or absolute for v = 0) counts as r = 0: then u = 0 and beta = 0,
# and the estimate alpha x + beta ||x|| u still reconstructs v.
_TINY = 1e-12


def _per_sample(fn, a):
  """Reduces over every axis but the first: [B, ...] -> [B]."""
  return fn(a.reshape(a.shape[0], -1), axis=1)


def _expand(a_B: jax.Array, like: jax.Array) -> jax.Array:
  return a_B.reshape(a_B.shape + (1,) * (like.ndim - 1))


def decompose(v: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Splits v [B, ...] relative to x [B, ...] into (alpha [B], beta [B], u [B, ...]).

  v = alpha x + beta ||x|| u with u of unit norm per sample and orthogonal to x (arXiv 2605.23381,
  Sec. 3; float32 at least). Where v is parallel to x (r = 0) u is 0 and beta 0; x = 0 is an error
  of the caller (VDE's states are never 0) and gives nan.
  """
  if v.shape != x.shape or x.ndim < 1:
    raise ValueError(f"v and x must share a shape [B, ...]; got v {v.shape} and x {x.shape}")
  dtype = jnp.result_type(v, x, jnp.float32)
  v, x = v.astype(dtype), x.astype(dtype)
  x_sq_B = _per_sample(jnp.sum, x * x)
  alpha_B = _per_sample(jnp.sum, v * x) / x_sq_B
  r = v - _expand(alpha_B, x) * x
  r_norm_B = jnp.sqrt(_per_sample(jnp.sum, r * r))
  v_norm_B = jnp.sqrt(_per_sample(jnp.sum, v * v))
  nonzero_B = r_norm_B > _TINY * jnp.maximum(v_norm_B, 1.0)
  u = r / _expand(jnp.where(nonzero_B, r_norm_B, 1.0), r) * _expand(nonzero_B, r)
  beta_B = jnp.where(nonzero_B, r_norm_B, 0.0) / jnp.sqrt(x_sq_B)
  return alpha_B, beta_B, u


def recompose(alpha_B: jax.Array, beta_B: jax.Array, u: jax.Array, x: jax.Array) -> jax.Array:
  """alpha x + beta ||x|| u for x, u [B, ...] and alpha, beta [B]: the velocity VDE estimates at x."""
  x_norm_B = jnp.sqrt(_per_sample(jnp.sum, x.astype(u.dtype) ** 2))
  return (_expand(alpha_B, x) * x + _expand(beta_B * x_norm_B, u) * u).astype(x.dtype)


def reorthogonalize(u: jax.Array, x: jax.Array) -> jax.Array:
  """u [B, ...] made orthogonal to x [B, ...] again and rescaled to unit norm per sample (u = 0 stays 0).

  A DEVIATION from arXiv 2605.23381's released code, for an ablation: the code recomposes with the
  last u, which is orthogonal to the x of its own step, not to the current x.
  """
  if u.shape != x.shape or x.ndim < 1:
    raise ValueError(f"u and x must share a shape [B, ...]; got u {u.shape} and x {x.shape}")
  x = x.astype(u.dtype)
  r = u - _expand(_per_sample(jnp.sum, u * x) / _per_sample(jnp.sum, x * x), x) * x
  r_norm_B = jnp.sqrt(_per_sample(jnp.sum, r * r))
  nonzero_B = r_norm_B > _TINY
  return r / _expand(jnp.where(nonzero_B, r_norm_B, 1.0), r) * _expand(nonzero_B, r)


def relative_error(v_hat: jax.Array, v: jax.Array) -> jax.Array:
  """||v_hat - v|| / ||v|| over all entries (a scalar; 0 where v = v_hat = 0)."""
  diff, norm = jnp.sqrt(jnp.sum((v_hat - v) ** 2)), jnp.sqrt(jnp.sum(v ** 2))
  return jnp.where(norm > 0, diff / jnp.where(norm > 0, norm, 1.0), jnp.where(diff > 0, jnp.inf, 0.0))


def extrapolate(t, t_prev, f_prev, t_last, f_last):
  """The line through (t_prev, f_prev) and (t_last, f_last), evaluated at t (any broadcastable shapes)."""
  return f_last + (t - t_last) * (f_last - f_prev) / (t_last - t_prev)


def full_step_indices(num_steps: int, stable_step: int, interval: int) -> tuple[int, ...]:
  """The steps (0-based) at which VDE's fixed schedule runs the model, increasing.

  Every step i <= stable_step, every i with (i - stable_step) % interval == 0 after it, and the last
  step (arXiv 2605.23381's released code). The skipped steps need two anchors, which are kept from
  step stable_step - 1 on, so stable_step >= 1. Flux's 50 steps with stable_step 6 and interval
  3 / 4 / 5 give 22 / 18 / 16 evaluations.
  """
  for name, value in (("num_steps", num_steps), ("stable_step", stable_step), ("interval", interval)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise ValueError(f"{name} must be an int; got {value!r}")
  if num_steps < 2:
    raise ValueError(f"num_steps must be >= 2; got {num_steps}")
  if not 1 <= stable_step < num_steps:
    raise ValueError(f"stable_step must be in [1, num_steps - 1] = [1, {num_steps - 1}] (two anchors "
                     f"before the first skipped step); got {stable_step}")
  if interval < 1:
    raise ValueError(f"interval must be >= 1; got {interval}")
  return tuple(i for i in range(num_steps)
               if i <= stable_step or (i - stable_step) % interval == 0 or i == num_steps - 1)
