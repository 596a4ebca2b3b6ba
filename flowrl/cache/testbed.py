"""An analytic testbed for the caching samplers: the exact rectified-flow velocity of a Gaussian-smoothed
empirical distribution, with exact classifier-free guidance.

  bed = testbed.mixture(means_NxD, smoothing=0.1, labels_N=labels)
  net = testbed.network(bed, y=y_B, cfg_scale=3.0)          # a sampling.Network, K = 2 branches
  x0, nfe = sampling.sample_network(net, x_T, 50, sampling.vde(6, 3))

The data x0 ~ (1 / N) sum_i N(mu_i, s^2 I) (N components, smoothing s); with the notation of
`core/flow.py`, x_t = (1 - t) x0 + t eps and v = E[eps - x0 | x_t] (rectified flow, arXiv 2209.03003).
Given component i, x_t ~ N((1 - t) mu_i, sigma_t^2 I) with sigma_t^2 = (1 - t)^2 s^2 + t^2, so the
posterior weight of component i is w_i ∝ exp(-||x_t - (1 - t) mu_i||^2 / (2 sigma_t^2)) and
    v(x_t, t) = sum_i w_i [a_t (x_t - (1 - t) mu_i) - mu_i],   a_t = (t - (1 - t) s^2) / sigma_t^2.
A smaller s makes the trajectories more curved (near t = 0 they bend towards the nearest mean); as
s -> 0 the data become the empirical distribution of the means. With a class label per component, the
conditional velocity given class y keeps only that class's components, and the unconditional one all
of them: the two branches of exact CFG.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from flowrl.cache import sampling


@flax.struct.dataclass
class Mixture:
  """A Gaussian-smoothed empirical distribution (see `mixture`)."""
  means: jax.Array        # [N, ...] the component means mu_i
  labels: jax.Array       # [N] int32, each component's class (all 0 without classes)
  smoothing: jax.Array    # s > 0, the components' standard deviation
  num_classes: int = flax.struct.field(pytree_node=False)   # 0: unconditional only


def mixture(means, smoothing: float, labels=None) -> Mixture:
  """The testbed distribution (1 / N) sum_i N(mu_i, s^2 I) for means [N, ...] and s = smoothing > 0.

  labels: optional int class of each component [N], covering 0 .. C - 1 (every class needs a
  component); then C = num_classes is the null label of the unconditional branch.
  """
  means = jnp.asarray(means, jnp.float32)
  if means.ndim < 2 or means.shape[0] < 1:
    raise ValueError(f"means must be [N, ...] with N >= 1 components; got shape {means.shape}")
  if not isinstance(smoothing, (int, float, np.floating, np.integer)) or not smoothing > 0:
    raise ValueError(f"smoothing must be a float > 0 (the components' standard deviation); got "
                     f"{smoothing!r}")
  if labels is None:
    return Mixture(means, jnp.zeros(means.shape[0], jnp.int32), jnp.float32(smoothing), 0)
  labels = np.asarray(labels)
  if labels.shape != means.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be int classes [N] = [{means.shape[0]}] (one per mean); got "
                     f"{labels.dtype} {labels.shape}")
  num_classes = int(labels.max()) + 1
  if labels.min() < 0 or len(np.unique(labels)) != num_classes:
    raise ValueError(f"labels must cover the classes 0 .. C - 1, each with a component; got "
                     f"{sorted(np.unique(labels).tolist())}")
  return Mixture(means, jnp.asarray(labels, jnp.int32), jnp.float32(smoothing), num_classes)


def velocity(bed: Mixture, x: jax.Array, t_B: jax.Array, y: jax.Array | None = None) -> jax.Array:
  """The exact velocity v [B, ...] at x [B, ...] (shaped like one mean), t [B] in [0, 1].

  y: int labels [B] in [0, num_classes]: class y's components only, num_classes (the null label)
  for all of them; None: all of them (the unconditional velocity).
  """
  b, means = x.shape[0], bed.means
  if x.shape[1:] != means.shape[1:]:
    raise ValueError(f"x must be [B, {', '.join(map(str, means.shape[1:]))}] like one mean; got "
                     f"shape {x.shape}")
  x_BxD, mu_NxD = x.reshape(b, -1).astype(jnp.float32), means.reshape(means.shape[0], -1)
  t = t_B.astype(jnp.float32)[:, None]
  s2 = bed.smoothing ** 2
  var_B1 = (1 - t) ** 2 * s2 + t ** 2
  # Squared distances as differences (not |x|^2 - 2 x.mu + |mu|^2): they stay exact for small sigma_t.
  diff_BxNxD = x_BxD[:, None] - (1 - t)[:, :, None] * mu_NxD[None]
  logits_BxN = -jnp.sum(diff_BxNxD ** 2, -1) / (2 * var_B1)
  if y is not None:
    keep_BxN = (bed.labels[None] == y[:, None]) | (y[:, None] == bed.num_classes)
    logits_BxN = jnp.where(keep_BxN, logits_BxN, -jnp.inf)
  w_BxN = jax.nn.softmax(logits_BxN, axis=-1)
  a_B1 = (t - (1 - t) * s2) / var_B1
  v_BxD = a_B1 * x_BxD - (a_B1 * (1 - t) + 1) * (w_BxN @ mu_NxD)
  return v_BxD.reshape(x.shape)


def network(bed: Mixture, *, y: jax.Array | None = None, cfg_scale: float = 1.0) -> sampling.Network:
  """The testbed as a `sampling.Network` (`sampling.velocity_network`), conditioned as a DiT.

  y: int labels [B] in [0, num_classes) of a labelled mixture, else None (the unconditional
  velocity). With y and cfg_scale != 1 the K = 2 branches are [class y; all components] (null label
  num_classes), mixed v_u + cfg_scale (v_c - v_u): exact CFG; otherwise K = 1.
  """
  if y is None:
    if cfg_scale != 1.0:
      raise ValueError(f"y (int labels [B]) is required for guidance (cfg_scale = {cfg_scale})")
    return sampling.velocity_network(lambda x, t: velocity(bed, x, t))
  if not bed.num_classes:
    raise ValueError("y was given, but the mixture has no labels (num_classes = 0)")
  y = jnp.asarray(y)
  if y.ndim != 1 or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"y must be int labels [B]; got {y.dtype} {y.shape}")
  return sampling.velocity_network(lambda x, t, labels: velocity(bed, x, t, labels), cond=y,
                                   null_cond=bed.num_classes, cfg_scale=cfg_scale)


def moments(bed: Mixture, y: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The data's mean [D] and covariance [D, D] (float64; D the size of one mean, flattened), of
  class y's components or (None) all of them: mean(mu_i) and s^2 I + the mu_i's population covariance."""
  mu = np.asarray(bed.means, np.float64).reshape(bed.means.shape[0], -1)
  if y is not None:
    mu = mu[np.asarray(bed.labels) == y]
  centred = mu - mu.mean(0)
  s2 = float(bed.smoothing) ** 2
  return mu.mean(0), s2 * np.eye(mu.shape[1]) + centred.T @ centred / mu.shape[0]
