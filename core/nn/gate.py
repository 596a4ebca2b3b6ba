"""PiD's sigma-aware gated injection (arXiv 2605.23902; design doc pid.md) as a Linen layer.

  x <- x + sigmoid([x, lq] @ w + b - exp(log_alpha) * sigma) * lq
per channel (w [2D, D]) or one scalar per token (w [2D, 1]). Initialised as in the paper's code: w
~ N(0, 0.01^2), b = 2, alpha = 5, so the gate starts near sigmoid(2 - 5 sigma): open for a clean latent,
closing as its noise level grows. The Pallas kernel (`kernels.sigma_gate`) runs under
`core.sharding.shard_kernel`, split over the batch of the mesh in context.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype

from core import sharding
from kernels.sigma_gate import sigma_gate

TOKENS = ("batch", "length", None)
GATE_KINDS = ("channel", "token")


def gated_injection(x_BxNxD: jax.Array, lq_BxNxD: jax.Array, sigma_B: jax.Array, w: jax.Array,
                    b: jax.Array, log_alpha: jax.Array, *, impl: str = "auto") -> jax.Array:
  """`kernels.sigma_gate` under `shard_kernel` (tokens and sigma split over the batch, the gate's
  parameters whole on every device). Shapes as `sigma_gate`; returns [B, N, D] in x's dtype."""
  fn = functools.partial(sigma_gate, impl=impl)
  dims = (TOKENS, TOKENS, ("batch",), (None, None), (None,), ())
  return sharding.shard_kernel(fn, (x_BxNxD, lq_BxNxD, sigma_B, w, b, log_alpha), dims, TOKENS)


class SigmaGate(nn.Module):
  """[B, N, D] tokens, [B, N, D] latent features, [B] latent noise level -> gated [B, N, D].

  Attributes:
    kind: "channel" (a gate per token and channel) or "token" (one per token).
    impl: the kernel's impl ("auto" | "pallas" | "xla"; see `kernels.sigma_gate`).
  """
  kind: str = "channel"
  impl: str = "auto"
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD: jax.Array, lq_BxNxD: jax.Array, sigma_B: jax.Array) -> jax.Array:
    if self.kind not in GATE_KINDS:
      raise ValueError(f"SigmaGate kind must be one of {GATE_KINDS}, got {self.kind!r}")
    d = x_BxNxD.shape[-1]
    g = d if self.kind == "channel" else 1
    w = self.param("w", nn.initializers.normal(0.01), (2 * d, g), self.param_dtype)
    b = self.param("b", nn.initializers.constant(2.0), (g,), self.param_dtype)
    log_alpha = self.param("log_alpha", nn.initializers.constant(math.log(5.0)), (), jnp.float32)
    return gated_injection(x_BxNxD, lq_BxNxD.astype(x_BxNxD.dtype), sigma_B.astype(jnp.float32),
                           w, b, log_alpha, impl=self.impl)
