"""Rewards for GRPO: plain jnp functions reward(x0 [B, ...], y [B]) -> [B] of the final samples.

  "outer_ring" (2-D, the double ring of core.data.two_d): exp(-(|x| - 2)^2 / (2 w^2)), w = RING_WIDTH.
    Its maximum 1 is the outer ring; the base model puts half its mass there and half on the inner
    ring (reward ~exp(-12.5) ~ 0), so it starts near 0.5, and an inconsistent sampler that blurs the
    rings loses reward even on the outer ring.
  "digit_logprob" (digits 16x16): log p(y | x) of a multinomial logistic regression fitted on the
    `digits` train split (in the model's [-1, 1] pixel scale): how recognisably the sample shows its
    conditioning class. Maximum 0.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from core import data
from core.data import two_d

RING_WIDTH = 0.2
REWARDS = ("outer_ring", "digit_logprob")


def outer_ring(x_Bx2: jax.Array, y_B: jax.Array | None = None) -> jax.Array:
  """exp(-(|x| - R_out)^2 / (2 RING_WIDTH^2)), R_out the outer radius of the double ring: [B] in (0, 1]."""
  radius_B = jnp.linalg.norm(x_Bx2.astype(jnp.float32), axis=-1)
  return jnp.exp(-((radius_B - max(two_d.RING_RADII)) ** 2) / (2 * RING_WIDTH ** 2))


@functools.lru_cache(maxsize=None)
def digit_classifier(config_name: str = "r16") -> tuple[np.ndarray, np.ndarray]:
  """(W float32 [H*W*C, 10], b float32 [10]) of a logistic regression on the digits train split.

  Fitted once per process (about a second; lbfgs is deterministic) on images scaled to [-1, 1].
  """
  from sklearn.linear_model import LogisticRegression  # here: importing sklearn costs ~1.3 s per
  # process, and every CLI start imports this module through experiments.tasks
  train = data.load_in_memory("digits", "train", config=config_name).arrays
  x_NxF = (train["image"].astype(np.float32) / 127.5 - 1.0).reshape(len(train["image"]), -1)
  fit = LogisticRegression(max_iter=2000).fit(x_NxF, train["label"])
  return fit.coef_.T.astype(np.float32), fit.intercept_.astype(np.float32)


def digit_logprob(x_BxHxWxC: jax.Array, y_B: jax.Array, config_name: str = "r16") -> jax.Array:
  """log p(y | x) under digit_classifier(config_name): [B] float32, <= 0."""
  w, b = digit_classifier(config_name)
  logits_Bx10 = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1).astype(jnp.float32) @ w + b
  return jnp.take_along_axis(jax.nn.log_softmax(logits_Bx10), y_B[:, None].astype(jnp.int32), 1)[:, 0]


def get(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The reward called `name` (one of REWARDS)."""
  if name not in REWARDS:
    raise ValueError(f"reward must be one of {REWARDS}; got {name!r}")
  return {"outer_ring": outer_ring, "digit_logprob": digit_logprob}[name]
