"""Attention, written once: `dot_product_attention` dispatches on impl; the layer uses it.

impl:
  "xla"    softmax attention as plain XLA ops (any backend, any dtype; softmax in float32).
  "cudnn"  cuDNN's fused flash attention (GPU, bf16/fp16, head dim a multiple of 8 and <= 128).
  "auto"   "cudnn" where those conditions hold, otherwise "xla".
  "linear" SANA's ReLU linear attention (arXiv 2410.10629 Sec. 2.2): `kernels.linear_attention`, the
           Pallas kernel on a GPU, its XLA reference elsewhere (`kernel_impl` chooses). O(N) in the
           sequence length. The kernel runs under `core.sharding.shard_kernel`: split over the batch
           and heads of the mesh in context, since XLA cannot partition a Pallas call.
"""
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype

from core import sharding
from core.nn.embeddings import apply_rope
from core.nn.norm import make_norm
from core.nn.partitioning import constrain, dense as named_dense
from kernels.linear_attention import linear_attention

# [B, N, H, D] activations: batch over the batch axes, heads over "model".
QKV_AXES = ("batch", "length", "heads", None)

IMPLS = ("xla", "cudnn", "auto", "linear")
# The denominator's eps of impl="linear": SANA's LiteLA uses 1e-8 (design doc sana_sr.md, "Corrections").
LINEAR_EPS = 1e-8


def _cudnn_unsupported(q: jax.Array, k: jax.Array, mask: jax.Array | None) -> str | None:
  """Why cuDNN's fused attention cannot take these inputs, or None when it can."""
  if jax.default_backend() != "gpu":
    return f"it needs a GPU, but JAX's default backend is {jax.default_backend()!r}"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"it needs bfloat16 or float16 q, k, v, got {q.dtype}"
  if q.shape[-1] % 8 or q.shape[-1] > 128:
    return f"it needs a head dim that is a multiple of 8 and at most 128, got {q.shape[-1]}"
  # A mask becomes a cuDNN bias, whose backward pass needs even sequence lengths.
  if mask is not None and (q.shape[1] % 2 or k.shape[1] % 2):
    return "with a mask it needs even query and key lengths"
  return None


def _check_inputs(q, k, v, mask) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, N, H, D]; got {q.shape}, {k.shape}, {v.shape}")
  b, nq, h, d = q.shape
  if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (h, d):
    raise ValueError(f"k and v must be [B, Nk, H, D] = [{b}, Nk, {h}, {d}] for q {q.shape}; "
                     f"got k {k.shape}, v {v.shape}")
  if mask is not None:
    full = (b, h, nq, k.shape[1])
    fits = all(m in (1, f) for m, f in zip(mask.shape[::-1], full[::-1]))
    if mask.dtype != jnp.bool_ or mask.ndim > 4 or not fits:
      raise ValueError(f"mask must be boolean and broadcastable to [B, H, Nq, Nk] = {full}; "
                       f"got {mask.dtype} {mask.shape}")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, impl: str = "xla",
                          kernel_impl: str = "auto") -> jax.Array:
  """softmax(q k^T / sqrt(D)) v per head, or ReLU linear attention for impl="linear".

  Args:
    q: [B, Nq, H, D] queries.
    k, v: [B, Nk, H, D] keys and values.
    mask: boolean, broadcastable to [B, H, Nq, Nk]; True = attend. A query row with nothing to
      attend to gets the mean of v. Not supported by "linear".
    impl: one of IMPLS (see the module docstring).
    kernel_impl: for impl="linear", `kernels.linear_attention`'s impl: "auto" (the Pallas kernel on a
      GPU where it fits), "pallas" (interpreted off a GPU: slow, for tests) or "xla".
  Returns:
    [B, Nq, H, D] in q's dtype.
  """
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
  _check_inputs(q, k, v, mask)
  if impl == "linear":
    if mask is not None:
      raise ValueError("impl='linear' (ReLU linear attention) does not support a mask")
    fn = functools.partial(linear_attention, eps=LINEAR_EPS, impl=kernel_impl)
    return sharding.shard_kernel(fn, (q, k, v), (QKV_AXES,) * 3, QKV_AXES)
  implementation = "xla"
  if impl != "xla":
    reason = _cudnn_unsupported(q, k, mask)
    if reason and impl == "cudnn":
      raise ValueError(f"attention impl 'cudnn' cannot run here: {reason}; "
                       "use impl='xla' or 'auto'")
    implementation = "xla" if reason else "cudnn"
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


class MultiHeadAttention(nn.Module):
  """Multi-head self- or cross-attention, [B, N, D] -> [B, N, D].

  Attributes:
    num_heads: H; the head dim is D / H.
    fused_qkv: one projection "qkv" (cross-attention: "q" and "kv") instead of "q", "k", "v".
    qk_norm: None, "layer" or "rms": normalise q and k per head before the dot product, which keeps
      the logits bounded in wide models (SD3, arXiv 2403.03206 Sec. 5.3.2).
    impl, kernel_impl: attention implementation, see `dot_product_attention`.
    use_bias: biases in the four projections.
    head_dim: the per-head width; default D / H. With it, q, k, v are H x head_dim wide whatever
      D is (a model whose heads were pruned, `sr/prune.py`).
    dtype: compute dtype; param_dtype: parameter dtype.
  """
  num_heads: int
  fused_qkv: bool = True
  qk_norm: str | None = None
  impl: str = "xla"
  kernel_impl: str = "auto"
  use_bias: bool = True
  head_dim: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD: jax.Array, context_BxMxE: jax.Array | None = None, *,
               rope: jax.Array | None = None, mask: jax.Array | None = None,
               kv_prefix: tuple[jax.Array, jax.Array] | None = None, return_kv: bool = False):
    """Attends from x to itself, or to context_BxMxE when given.

    Args:
      x_BxNxD: the queries' input (and the keys'/values' in self-attention).
      context_BxMxE: the keys'/values' input for cross-attention.
      rope: rotary angles [N, D/H/2] or [B, N, D/H/2] (`rope_1d`, `rope_2d`) applied to q and k;
        self-attention only, since queries and keys then share positions.
      mask: boolean, broadcastable to [B, H, N, P + N] (P = the prefix length, 0 without one) or
        [B, H, N, M]; True = attend.
      kv_prefix: cached (k, v), each [B, P, H, D/H] as returned by an earlier call with
        return_kv=True (keys already rotated); the queries attend to them before x's own keys.
      return_kv: also return x's own (k, v), for a cache.
    Returns:
      [B, N, D], or ([B, N, D], (k, v)) with return_kv.
    """
    width = x_BxNxD.shape[-1]
    if self.head_dim is None and width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    d = width if self.head_dim is None else self.num_heads * self.head_dim    # q, k, v width
    if rope is not None and context_BxMxE is not None:
      raise ValueError("rope is for self-attention; cross-attention got both rope and a context")
    # In-projections split their outputs by head, the out-projection its inputs: with a model
    # axis, attention runs head-parallel and the block needs one reduction, not a gather.
    dense = lambda features, axes, name: named_dense(
        features, axes, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    proj = lambda features, name, x: dense(features, ("embed", "heads"), name)(x)
    if context_BxMxE is None and self.fused_qkv:
      # A model split of the fused [D, 3D] kernel's outputs would cut across q, k and v, so it is
      # split by FSDP only; q, k, v are then sliced by head locally (no communication).
      q, k, v = jnp.split(dense(3 * d, ("embed", None), "qkv")(x_BxNxD), 3, axis=-1)
    else:
      kv_in = x_BxNxD if context_BxMxE is None else context_BxMxE
      q = proj(d, "q", x_BxNxD)
      if self.fused_qkv:
        k, v = jnp.split(dense(2 * d, ("embed", None), "kv")(kv_in), 2, axis=-1)
      else:
        k, v = proj(d, "k", kv_in), proj(d, "v", kv_in)
    q, k, v = (constrain(y.reshape(*y.shape[:-1], self.num_heads, -1), QKV_AXES) for y in (q, k, v))
    if self.qk_norm is not None:
      norm = functools.partial(make_norm, self.qk_norm, affine=True, dtype=self.dtype,
                               param_dtype=self.param_dtype)
      q, k = norm(name="q_norm")(q), norm(name="k_norm")(k)
    if rope is not None:
      q, k = apply_rope(q, rope), apply_rope(k, rope)
    own_kv = (k, v)
    if kv_prefix is not None:
      k, v = (jnp.concatenate([p, a], axis=1) for p, a in zip(kv_prefix, own_kv))
    o = dot_product_attention(q, k, v, mask=mask, impl=self.impl, kernel_impl=self.kernel_impl)
    out = dense(width, ("heads", "embed"), "out")(o.reshape(*o.shape[:-2], d))
    return (out, own_kv) if return_kv else out
