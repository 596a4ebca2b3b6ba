"""GRPO for flow models (Flow-GRPO arXiv 2505.05470, DanceGRPO arXiv 2505.07818, Precise arXiv 2605.23522).

Per condition a group of G trajectories is sampled with an SDE sampler (flowrl.samplers); the final
samples' rewards give group-relative advantages, and every trained step's Gaussian transition is a
"token" of the policy: ratio = exp(log p_theta(x_s | x_t) - log p_old(x_s | x_t)) enters PPO's clipped
surrogate (+ beta * KL to the reference policy).

Flow-GRPO splits each sampled batch into several optimiser updates (its gradient accumulation spans
part of the epoch's samples); the first update is on-policy (ratio 1 in value, its gradient the policy
gradient), the later ones are off-policy and the clip range bounds them. flowrl.task keeps the sampled
batch in the trainer's carry for `updates_per_batch` steps.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from core import flow
from flowrl import samplers


def group_advantages(rewards_NxG: jax.Array, *, global_std: bool = False, eps: float = 1e-4,
                     clip: float = 5.0) -> jax.Array:
  """(r - group mean) / (std + eps), clipped to [-clip, clip]: [N, G] float32.

  std is the group's (population) std, or with global_std that of all N * G rewards (Flow-GRPO's
  global_std option). A group with equal rewards gets advantage 0.
  """
  if rewards_NxG.ndim != 2:
    raise ValueError(f"rewards must have shape [num_groups, group_size]; got {rewards_NxG.shape}")
  r = rewards_NxG.astype(jnp.float32)
  std = r.std() if global_std else r.std(axis=1, keepdims=True)
  return jnp.clip((r - r.mean(axis=1, keepdims=True)) / (std + eps), -clip, clip)


def clipped_surrogate(log_ratio: jax.Array, advantages: jax.Array, clip_range: float) -> jax.Array:
  """PPO's loss mean(max(-A ratio, -A clip(ratio, 1 - e, 1 + e))) (arXiv 1707.06347, Eq. 7, negated).

  log_ratio and advantages broadcast together (e.g. [K, B] and [B]); returns a scalar.
  """
  ratio = jnp.exp(log_ratio)
  return jnp.maximum(-advantages * ratio,
                     -advantages * jnp.clip(ratio, 1 - clip_range, 1 + clip_range)).mean()


def _mean_sq_B(diff: jax.Array) -> jax.Array:
  return (diff.astype(jnp.float32) ** 2).reshape(diff.shape[0], -1).mean(axis=1)


def ratio_norm(log_ratio_B: jax.Array, mean_new: jax.Array, mean_old: jax.Array, std) -> jax.Array:
  """GRPO-Guard's RatioNorm (arXiv 2510.22319, Eq. 8): std * (log r + mean ||mu_new - mu_old||^2 / (2 std^2)).

  For a Gaussian step, log r = (z . dmu) / std - ||dmu||^2 / (2 std^2) (per-dim means, z the step's
  noise): the second term biases every ratio below 1 and the first grows like 1 / std, so steps with
  small std dominate the clip. Adding the bias back and scaling by std leaves z . dmu, comparable
  across steps. (Read from the public GRPO-Guard reference code; std is the step's scalar std.)

  log_ratio_B: [B]; mean_new, mean_old: [B, ...]; std: scalar or broadcastable to the means.
  """
  std_B = jnp.broadcast_to(jnp.asarray(std, jnp.float32), mean_new.shape).reshape(
      mean_new.shape[0], -1).mean(axis=1)
  return std_B * (log_ratio_B + _mean_sq_B(mean_new - mean_old) / (2 * std_B ** 2))


def kl_to_reference(mean: jax.Array, mean_ref: jax.Array, std) -> jax.Array:
  """KL(N(mean, std^2) || N(mean_ref, std^2)) per dim, averaged over non-batch dims: [B].

  = mean ||mu - mu_ref||^2 / (2 std^2), Flow-GRPO's KL term (arXiv 2505.05470, Sec. 4).
  """
  std_B = jnp.broadcast_to(jnp.asarray(std, jnp.float32), mean.shape).reshape(mean.shape[0], -1).mean(1)
  return _mean_sq_B(mean - mean_ref) / (2 * std_B ** 2)


def choose_steps(key: jax.Array, sde_mask: jax.Array, num_train: int) -> jax.Array:
  """num_train distinct step indices drawn uniformly among the True entries of sde_mask [T]: int32 [K].

  Flow-GRPO trains on a random int(timestep_fraction * T) of the steps each iteration; sde_mask may be
  traced (a sliding window) but must hold at least num_train True entries.
  """
  if not 1 <= num_train <= sde_mask.shape[0]:
    raise ValueError(f"num_train must be in [1, {sde_mask.shape[0]}]; got {num_train}")
  scores = jnp.where(sde_mask, jax.random.uniform(key, sde_mask.shape), -1.0)
  return jax.lax.top_k(scores, num_train)[1].astype(jnp.int32)


WINDOW_KINDS = ("sliding", "random")


def window_start(iteration, key: jax.Array, *, num_positions: int, kind: str, every: int = 1):
  """Where an SDE window of fixed size starts at this iteration: int32 [] in [0, num_positions).

  kind "sliding" (MixGRPO arXiv 2507.21802): moves one step later every `every` iterations, cycling;
  "random" (Flow-GRPO-Fast): uniform each iteration.
  """
  if kind == "sliding":
    return (jnp.asarray(iteration) // every % num_positions).astype(jnp.int32)
  if kind == "random":
    return jax.random.randint(key, (), 0, num_positions, jnp.int32)
  raise ValueError(f"window kind must be one of {WINDOW_KINDS}; got {kind!r}")


def policy_loss(velocity_fn: flow.VelocityFn, traj: samplers.Trajectory, advantages_B: jax.Array,
                steps_K: jax.Array, *, method: str, eta, clip_range: float, beta: float = 0.0,
                ref_velocity_fn: flow.VelocityFn | None = None, use_ratio_norm: bool = False):
  """The GRPO loss of the current policy `velocity_fn` on the trained steps of a sampled trajectory.

  Args:
    velocity_fn: (x [B, ...], t [B]) -> v of the policy being trained (gradients flow through it).
    traj: trajectories sampled by the old policy (its means and log_probs are the old policy's; its
      arrays carry no gradient).
    advantages_B: [B]; steps_K: int [K] indices of stochastic steps (choose_steps).
    method, eta: the sampler traj was drawn with.
    clip_range: PPO's e; beta: weight of the KL to ref_velocity_fn (required when beta > 0).
    use_ratio_norm: ratio normalisation as in Precise's public trainer: GRPO-Guard's RatioNorm on
      the log-ratios, and each step's loss divided by that step's |d mean / d v|
      (`samplers.mean_velocity_gain`, no gradient), which gives every step and sampler the same
      gradient scale per unit of velocity.
  Returns:
    (scalar loss, {"policy_loss", "kl", "clip_frac", "grad_frac"}): clip_frac, the fraction of
    (step, sample) tokens with |ratio - 1| > clip_range; grad_frac, the fraction whose surrogate
    still carries a gradient.
  """
  if beta > 0 and ref_velocity_fn is None:
    raise ValueError("beta > 0 needs ref_velocity_fn (the reference policy)")
  x_K, x_next_K = traj.xs[steps_K], traj.xs[steps_K + 1]
  t_K, s_K = traj.times[steps_K], traj.times[steps_K + 1]
  old_mean_K, old_logp_K = traj.means[steps_K], traj.log_probs[steps_K]
  batch = x_K.shape[1]

  def means(fn, x, t, s):
    v = fn(x, jnp.full((batch,), t))
    _, mean, std = samplers.sde_step(method, x, v, t, s, jnp.zeros_like(x), eta)
    return mean, std

  def per_step(x, x_next, t, s, old_mean, old_logp):
    mean, std = means(velocity_fn, x, t, s)
    log_ratio = samplers.gaussian_log_prob(x_next, mean, std) - old_logp
    if use_ratio_norm:
      log_ratio = ratio_norm(log_ratio, mean, old_mean, std)
    kl = jnp.zeros((batch,), jnp.float32)
    if beta > 0:
      kl = kl_to_reference(mean, jax.lax.stop_gradient(means(ref_velocity_fn, x, t, s)[0]), std)
    gain = samplers.mean_velocity_gain(method, t, s, eta, x[:1]).mean() if use_ratio_norm else 1.0
    return log_ratio, kl, gain

  log_ratio_KxB, kl_KxB, gain_K = jax.vmap(per_step)(x_K, x_next_K, t_K, s_K, old_mean_K, old_logp_K)
  if use_ratio_norm:      # per step: the batch's clipped surrogate / |d mean / d v|, then the mean
    surrogate = jax.vmap(clipped_surrogate, (0, None, None))(log_ratio_KxB, advantages_B, clip_range)
    surrogate = (surrogate / jax.lax.stop_gradient(gain_K)).mean()
  else:
    surrogate = clipped_surrogate(log_ratio_KxB, advantages_B, clip_range)
  kl = kl_KxB.mean()
  ratio_KxB = jnp.exp(log_ratio_KxB)
  # Tokens outside the clip range (the public codes' clipfrac), and tokens whose surrogate still has
  # a gradient: PPO's max picks the constant clipped branch when A > 0 and ratio > 1 + e or A < 0
  # and ratio < 1 - e, and A = 0 contributes nothing.
  clip_frac = (jnp.abs(ratio_KxB - 1) > clip_range).mean()
  dead = (((advantages_B > 0) & (ratio_KxB > 1 + clip_range))
          | ((advantages_B < 0) & (ratio_KxB < 1 - clip_range)) | (advantages_B == 0))
  return surrogate + beta * kl, {"policy_loss": surrogate, "kl": kl, "clip_frac": clip_frac,
                                 "grad_frac": 1 - dead.mean()}


def group_noise(key: jax.Array, num_groups: int, group_size: int, shape: tuple[int, ...], *,
                same_noise: bool) -> jax.Array:
  """Initial noise for num_groups groups of group_size trajectories: [num_groups * group_size, *shape].

  same_noise: every member of a group starts from the same noise (then only the SDE's noise makes
  the group differ, as in DanceGRPO); else each draws its own (Flow-GRPO).
  """
  noise = jax.random.normal(key, (num_groups, 1 if same_noise else group_size, *shape))
  return jnp.broadcast_to(noise, (num_groups, group_size, *shape)).reshape(-1, *shape)
