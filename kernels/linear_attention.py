"""Non-causal ReLU linear attention (SANA's LiteLA, arXiv 2410.10629 Sec. 2.2): Pallas kernels, reference, VJP.

Per batch b and head h, with phi = relu and every sum in float32:
  S = sum_j phi(k_j)^T v_j   [D, Dv]        z = sum_j phi(k_j)   [D]
  out_i = phi(q_i) S / (phi(q_i) . z + eps)
The work is linear in N and memory-bound, so the kernels read q, k, v once each in their [B, N, H, D]
layout (a head is a strided [N, D] view: no transpose pass) and keep S and z, which are tiny, in float32.

Forward: `_kv_sums` (keys -> S, z partial sums per chunk of tokens; XLA adds the few chunks), then
`_output` (queries -> out). Backward, with g the cotangent of out and den_i = phi(q_i) . z + eps:
  dnum_i = g_i / den_i                 dden_i = -(g_i . out_i) / den_i
  dq_i = 1[q_i > 0] (dnum_i S^T + dden_i z)
  dS = sum_i phi(q_i)^T dnum_i         dz = sum_i dden_i phi(q_i)
  dk_j = 1[k_j > 0] (v_j dS^T + dz)    dv_j = phi(k_j) dS
`_query_grads` computes dq and partial (dS, dz); `_key_grads` computes dk and dv. Residuals are q, k, v
and the float32 (S, z); out is recomputed in float32 rather than read back in the output dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import common

# 128 tokens per tile, 4 warps: the best of the sweep in kernels/bench.py on an H100 (BENCHMARKS.md).
DEFAULT_BLOCKS = common.BlockSizes(rows=128, num_warps=4)
# The token reductions split each (batch, head) into chunks until there are about this many programs:
# ~16 per H100 SM, so that each SM holds several at once and the last wave is short. A chunk's partial
# sums cost D * Dv * 4 bytes, negligible beside the chunk's k and v once a chunk spans a few blocks.
TARGET_PROGRAMS = 2048


def linear_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                               eps: float = 1e-6) -> jax.Array:
  """Plain-XLA linear attention. q [B, N, H, D], k [B, Nk, H, D], v [B, Nk, H, Dv] -> [B, N, H, Dv]."""
  f32 = jnp.float32
  phi_q, phi_k = jax.nn.relu(q).astype(f32), jax.nn.relu(k).astype(f32)
  hi = lax.Precision.HIGHEST
  s_BxHxDxE = jnp.einsum("bnhd,bnhe->bhde", phi_k, v.astype(f32), precision=hi)
  z_BxHxD = phi_k.sum(axis=1)
  num = jnp.einsum("bnhd,bhde->bnhe", phi_q, s_BxHxDxE, precision=hi)
  den = jnp.einsum("bnhd,bhd->bnh", phi_q, z_BxHxD, precision=hi)[..., None] + eps
  return (num / den).astype(v.dtype)


def _check_inputs(q, k, v) -> None:
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"linear_attention: {name} must be [B, N, H, D], got shape {x.shape}")
    common.check_float(f"linear_attention: {name}", x)
  b, _, h, d = q.shape
  if k.shape[0] != b or k.shape[2:] != (h, d):
    raise ValueError(f"linear_attention: k must be [B, Nk, H, D] = [{b}, Nk, {h}, {d}] to match "
                     f"q {q.shape}, got {k.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"linear_attention: v must be [B, Nk, H, Dv] = [{b}, {k.shape[1]}, {h}, Dv] "
                     f"to match k {k.shape}, got {v.shape}")
  if not q.dtype == k.dtype == v.dtype:
    raise TypeError(f"linear_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _unsupported(q, v) -> str | None:
  """Why the compiled (Triton) kernel cannot take these shapes, or None."""
  d, dv = q.shape[-1], v.shape[-1]
  if q.dtype not in common.KERNEL_DTYPES:
    return f"it takes float32, bfloat16 or float16, got {q.dtype}"
  if not (common.is_pow2(d) and common.is_pow2(dv) and 16 <= min(d, dv) and max(d, dv) <= 128):
    return f"head dims must be powers of two in [16, 128], got D={d}, Dv={dv}"
  return None


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, eps: float = 1e-6,
                     impl: str = "auto", interpret: bool | None = None,
                     block_sizes: common.BlockSizes = DEFAULT_BLOCKS) -> jax.Array:
  """ReLU linear attention: out_i = relu(q_i) S / (relu(q_i) . z + eps), per batch and head.

  Args:
    q: [B, N, H, D] queries. k: [B, Nk, H, D] keys. v: [B, Nk, H, Dv] values. One float dtype.
    eps: keeps rows whose relu(q) . z is 0 finite (their output is 0).
    impl: "xla" (the reference), "pallas" (the kernel), "auto" (the kernel on a GPU where the head
      dims fit, the reference otherwise).
    interpret: run the Pallas kernel in interpret mode; None = on every backend but a GPU.
    block_sizes: the kernel's tiling (`rows` tokens per tile, `num_warps`; `cols` is unused).
  Returns:
    [B, N, H, Dv] in v's dtype; differentiable in q, k and v.
  """
  _check_inputs(q, k, v)
  if not isinstance(block_sizes, common.BlockSizes):
    raise TypeError(f"linear_attention: block_sizes must be a kernels.common.BlockSizes, got "
                    f"{type(block_sizes).__name__}")
  interpret = common.resolve_interpret(interpret)
  impl = common.choose_impl(impl, interpret, _unsupported(q, v), "linear_attention")
  if impl == "xla":
    return linear_attention_reference(q, k, v, eps=eps)
  n, nk = q.shape[1], k.shape[1]
  block_q, block_k = common.row_block(n, block_sizes.rows), common.row_block(nk, block_sizes.rows)
  # Zero rows are inert: a zero key adds nothing to S and z, a zero query's output (sliced off) is 0.
  q_p, k_p, v_p = (common.pad_rows(q, 1, block_q), common.pad_rows(k, 1, block_k),
                   common.pad_rows(v, 1, block_k))
  out = _linear_attention(q_p, k_p, v_p, float(eps), interpret, block_q, block_k,
                          block_sizes.num_warps)
  return out[:, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _linear_attention(q, k, v, eps, interpret, block_q, block_k, warps):
  return _forward(q, k, v, eps, interpret, block_q, block_k, warps)[0]


def _forward(q, k, v, eps, interpret, block_q, block_k, warps):
  s, z = _kv_sums(k, v, block_k, interpret, warps)
  return _output(q, s, z, eps, block_q, interpret, warps), (q, k, v, s, z)


def _backward(eps, interpret, block_q, block_k, warps, residuals, g):
  q, k, v, s, z = residuals
  dq, ds, dz = _query_grads(q, g, s, z, eps, block_q, interpret, warps)
  dk, dv = _key_grads(k, v, ds, dz, block_k, interpret, warps)
  return dq, dk, dv


_linear_attention.defvjp(_forward, _backward)


def _chunks(num_blocks: int, batch_heads: int) -> int:
  """How many chunks a token reduction is split into: enough programs to fill the GPU, and a divisor
  of the block count so that every chunk has the same static trip count."""
  return common.largest_divisor_at_most(num_blocks, max(1, TARGET_PROGRAMS // batch_heads))


def _rows(i, block: int):
  return pl.ds(pl.multiple_of(i * block, block), block)


def _dot(a, b, contract, precision):
  """a @ b contracting a's dim contract[0] with b's dim contract[1], accumulated in float32."""
  return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


# --- forward ------------------------------------------------------------------------------------

def _kv_sums_kernel(k_ref, v_ref, s_ref, z_ref, *, block, steps, precision):
  """One (batch, head, chunk): k_ref [L, D], v_ref [L, Dv] -> s_ref [D, Dv], z_ref [1, D]."""
  def body(i, carry):
    s, z = carry
    phi_k = jnp.maximum(k_ref[_rows(i, block), :], 0)
    s = s + _dot(phi_k, v_ref[_rows(i, block), :], (0, 0), precision)
    z = z + jnp.sum(phi_k.astype(jnp.float32), axis=0, keepdims=True)
    return s, z
  s, z = lax.fori_loop(0, steps, body, (jnp.zeros(s_ref.shape, jnp.float32),
                                         jnp.zeros(z_ref.shape, jnp.float32)))
  s_ref[...] = s
  z_ref[...] = z


def _kv_sums(k, v, block, interpret, warps):
  """k [B, Nk, H, D], v [B, Nk, H, Dv] (Nk a multiple of block) -> S [B, H, D, Dv], z [B, H, 1, D]."""
  b, nk, h, d = k.shape
  dv = v.shape[-1]
  chunks = _chunks(nk // block, b * h)
  length = nk // chunks
  kernel = functools.partial(_kv_sums_kernel, block=block, steps=length // block,
                             precision=common.dot_precision(k.dtype))
  s_part, z_part = pl.pallas_call(
      kernel, grid=(b, h, chunks),
      in_specs=[pl.BlockSpec((None, length, None, d), lambda i, j, c: (i, c, j, 0)),
                pl.BlockSpec((None, length, None, dv), lambda i, j, c: (i, c, j, 0))],
      out_specs=[pl.BlockSpec((None, None, None, d, dv), lambda i, j, c: (i, j, c, 0, 0)),
                 pl.BlockSpec((None, None, None, 1, d), lambda i, j, c: (i, j, c, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, h, chunks, d, dv), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, chunks, 1, d), jnp.float32)],
      compiler_params=common.triton_params(warps, num_stages=3), interpret=interpret,
      name="linear_attention_kv_sums")(k, v)
  return s_part.sum(axis=2), z_part.sum(axis=2)


def _output_kernel(q_ref, s_ref, z_ref, o_ref, *, eps, precision):
  """One (batch, head, token block): q_ref [bn, D], s_ref [D, Dv], z_ref [1, D] -> o_ref [bn, Dv]."""
  phi_q = jnp.maximum(q_ref[...], 0).astype(jnp.float32)
  num = _dot(phi_q, s_ref[...], (1, 0), precision)
  den = jnp.sum(phi_q * z_ref[...], axis=1, keepdims=True) + eps
  o_ref[...] = (num / den).astype(o_ref.dtype)


def _output(q, s, z, eps, block, interpret, warps):
  """q [B, N, H, D], S [B, H, D, Dv], z [B, H, 1, D] -> out [B, N, H, Dv] in q's dtype."""
  b, n, h, d = q.shape
  dv = s.shape[-1]
  kernel = functools.partial(_output_kernel, eps=eps, precision=common.dot_precision(q.dtype))
  return pl.pallas_call(
      kernel, grid=(b, h, n // block),
      in_specs=[pl.BlockSpec((None, block, None, d), lambda i, j, t: (i, t, j, 0)),
                pl.BlockSpec((None, None, d, dv), lambda i, j, t: (i, j, 0, 0)),
                pl.BlockSpec((None, None, 1, d), lambda i, j, t: (i, j, 0, 0))],
      out_specs=pl.BlockSpec((None, block, None, dv), lambda i, j, t: (i, t, j, 0)),
      out_shape=jax.ShapeDtypeStruct((b, n, h, dv), q.dtype),
      compiler_params=common.triton_params(warps), interpret=interpret,
      name="linear_attention_output")(q, s, z)


# --- backward -----------------------------------------------------------------------------------

def _query_grads_kernel(q_ref, g_ref, s_ref, z_ref, dq_ref, ds_ref, dz_ref, *, block, steps, eps,
                        precision):
  """One (batch, head, chunk): q_ref [L, D], g_ref [L, Dv] -> dq_ref [L, D], ds_ref [D, Dv],
  dz_ref [1, D] (the chunk's share of dS and dz)."""
  s, z = s_ref[...], z_ref[...]

  def body(i, carry):
    ds, dz = carry
    q = q_ref[_rows(i, block), :].astype(jnp.float32)
    g = g_ref[_rows(i, block), :].astype(jnp.float32)
    phi_q = jnp.maximum(q, 0.0)
    den = jnp.sum(phi_q * z, axis=1, keepdims=True) + eps
    out = _dot(phi_q, s, (1, 0), precision) / den
    dnum = g / den
    dden = -jnp.sum(g * out, axis=1, keepdims=True) / den
    dphi = _dot(dnum, s, (1, 1), precision) + dden * z
    dq_ref[_rows(i, block), :] = jnp.where(q > 0, dphi, 0.0).astype(dq_ref.dtype)
    ds = ds + _dot(phi_q, dnum, (0, 0), precision)
    dz = dz + jnp.sum(dden * phi_q, axis=0, keepdims=True)
    return ds, dz
  ds, dz = lax.fori_loop(0, steps, body, (jnp.zeros(ds_ref.shape, jnp.float32),
                                          jnp.zeros(dz_ref.shape, jnp.float32)))
  ds_ref[...] = ds
  dz_ref[...] = dz


def _query_grads(q, g, s, z, eps, block, interpret, warps):
  """q [B, N, H, D], g [B, N, H, Dv] -> dq [B, N, H, D], dS [B, H, D, Dv], dz [B, H, 1, D]."""
  b, n, h, d = q.shape
  dv = g.shape[-1]
  chunks = _chunks(n // block, b * h)
  length = n // chunks
  kernel = functools.partial(_query_grads_kernel, block=block, steps=length // block, eps=eps,
                             precision=common.dot_precision(q.dtype))
  dq, ds_part, dz_part = pl.pallas_call(
      kernel, grid=(b, h, chunks),
      in_specs=[pl.BlockSpec((None, length, None, d), lambda i, j, c: (i, c, j, 0)),
                pl.BlockSpec((None, length, None, dv), lambda i, j, c: (i, c, j, 0)),
                pl.BlockSpec((None, None, d, dv), lambda i, j, c: (i, j, 0, 0)),
                pl.BlockSpec((None, None, 1, d), lambda i, j, c: (i, j, 0, 0))],
      out_specs=[pl.BlockSpec((None, length, None, d), lambda i, j, c: (i, c, j, 0)),
                 pl.BlockSpec((None, None, None, d, dv), lambda i, j, c: (i, j, c, 0, 0)),
                 pl.BlockSpec((None, None, None, 1, d), lambda i, j, c: (i, j, c, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, chunks, d, dv), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, chunks, 1, d), jnp.float32)],
      compiler_params=common.triton_params(warps, num_stages=3), interpret=interpret,
      name="linear_attention_query_grads")(q, g, s, z)
  return dq, ds_part.sum(axis=2), dz_part.sum(axis=2)


def _key_grads_kernel(k_ref, v_ref, ds_ref, dz_ref, dk_ref, dv_ref, *, precision):
  """One (batch, head, token block): k_ref [bn, D], v_ref [bn, Dv] -> dk_ref, dv_ref."""
  k = k_ref[...].astype(jnp.float32)
  ds = ds_ref[...]
  dphi = _dot(v_ref[...].astype(jnp.float32), ds, (1, 1), precision) + dz_ref[...]
  dk_ref[...] = jnp.where(k > 0, dphi, 0.0).astype(dk_ref.dtype)
  dv_ref[...] = _dot(jnp.maximum(k, 0.0), ds, (1, 0), precision).astype(dv_ref.dtype)


def _key_grads(k, v, ds, dz, block, interpret, warps):
  """k [B, Nk, H, D], v [B, Nk, H, Dv], dS [B, H, D, Dv], dz [B, H, 1, D] -> dk, dv."""
  b, nk, h, d = k.shape
  dv = v.shape[-1]
  kernel = functools.partial(_key_grads_kernel, precision=common.dot_precision(k.dtype))
  return pl.pallas_call(
      kernel, grid=(b, h, nk // block),
      in_specs=[pl.BlockSpec((None, block, None, d), lambda i, j, t: (i, t, j, 0)),
                pl.BlockSpec((None, block, None, dv), lambda i, j, t: (i, t, j, 0)),
                pl.BlockSpec((None, None, d, dv), lambda i, j, t: (i, j, 0, 0)),
                pl.BlockSpec((None, None, 1, d), lambda i, j, t: (i, j, 0, 0))],
      out_specs=[pl.BlockSpec((None, block, None, d), lambda i, j, t: (i, t, j, 0)),
                 pl.BlockSpec((None, block, None, dv), lambda i, j, t: (i, t, j, 0))],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=common.triton_params(warps), interpret=interpret,
      name="linear_attention_key_grads")(k, v, ds, dz)
