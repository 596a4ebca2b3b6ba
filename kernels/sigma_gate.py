"""PiD's sigma-aware gate (arXiv 2605.23902; design doc pid.md): Pallas kernels, reference, VJP.

  out = x + sigmoid([x, lq] @ w + b - exp(log_alpha) * sigma) * lq
x are backbone tokens, lq the adapter's features of the (possibly noisy) latent, sigma that latent's
noise level per sample. The gate is per channel (w [2D, D]) or one scalar per token (w [2D, 1]).

The kernels take w as its two halves (w_x, w_lq) and the per-sample bias c = b - exp(log_alpha) sigma
([B, G], computed by XLA), so the concatenation is never materialised and the custom VJP needs only the
gradient of c: XLA's autodiff carries it on to b, log_alpha and sigma. With a = x w_x + lq w_lq + c,
s = sigmoid(a) and g the cotangent of out:
  da = g_G * lq_G * s (1 - s)    (g_G, lq_G: g * lq summed over channels when G = 1)
  dx = g + da w_x^T     dlq = g s + da w_lq^T     dw_x = x^T da     dw_lq = lq^T da     dc = sum_n da
Per-channel gate: `_channel_gate` (forward: a matmul tile with the gate as its epilogue),
`_channel_gate_grads` (recomputes a; writes da and g s), `_channel_input_grads` (dx, dlq: a matmul with
da and its epilogue); the weight gradients, plain GEMMs over all tokens, go to XLA (cuBLAS).
Per-token gate: `_token_gate` and `_token_gate_grads`, one pass each over the rows, the latter also
writing each row block's share of dw.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import common

# 64 tokens x 128 channels per tile, 4 warps: the default of the sweep in kernels/bench.py.
DEFAULT_BLOCKS = common.BlockSizes(rows=64, cols=128, num_warps=4)


def sigma_gate_reference(x, lq, sigma, w, b, log_alpha) -> jax.Array:
  """Plain XLA, as written in the paper's code: concatenate, project, gate. Shapes as `sigma_gate`."""
  xlq = jnp.concatenate([x, lq], axis=-1)
  a = jnp.einsum("bnk,kg->bng", xlq, w.astype(x.dtype), preferred_element_type=jnp.float32,
                 precision=lax.Precision.HIGHEST)
  a = a + b.astype(jnp.float32) - jnp.exp(log_alpha) * sigma[:, None, None]
  return (x.astype(jnp.float32) + jax.nn.sigmoid(a) * lq.astype(jnp.float32)).astype(x.dtype)


def _check_inputs(x, lq, sigma, w, b, log_alpha) -> None:
  for name, arr in (("x", x), ("lq", lq), ("sigma", sigma), ("w", w), ("b", b),
                    ("log_alpha", log_alpha)):
    common.check_float(f"sigma_gate: {name}", arr)
  if x.ndim != 3:
    raise ValueError(f"sigma_gate: x must be [B, N, D], got shape {x.shape}")
  bsz, _, d = x.shape
  if lq.shape != x.shape:
    raise ValueError(f"sigma_gate: lq must be [B, N, D] = {x.shape} like x, got {lq.shape}")
  if lq.dtype != x.dtype:
    raise TypeError(f"sigma_gate: lq must have x's dtype {x.dtype}, got {lq.dtype}")
  if sigma.shape != (bsz,):
    raise ValueError(f"sigma_gate: sigma must be [B] = ({bsz},), got shape {sigma.shape}")
  if w.ndim != 2 or w.shape[0] != 2 * d or w.shape[1] not in (1, d):
    raise ValueError(f"sigma_gate: w must be [2D, G] with G = D (per channel) or 1 (per token): "
                     f"[{2 * d}, {d}] or [{2 * d}, 1], got {w.shape}")
  if b.shape != (w.shape[1],):
    raise ValueError(f"sigma_gate: b must be [G] = ({w.shape[1]},), got shape {b.shape}")
  if jnp.shape(log_alpha) != ():
    raise ValueError(f"sigma_gate: log_alpha must be a scalar, got shape {jnp.shape(log_alpha)}")


def _unsupported(x) -> str | None:
  """Why the compiled (Triton) kernels cannot take these shapes, or None."""
  d = x.shape[-1]
  if x.dtype not in common.KERNEL_DTYPES:
    return f"it takes float32, bfloat16 or float16, got {x.dtype}"
  if common.pow2_tile(d, 1024) is None:
    return f"D must be a multiple of 16, got {d}"
  return None


def sigma_gate(x: jax.Array, lq: jax.Array, sigma: jax.Array, w: jax.Array, b: jax.Array,
               log_alpha: jax.Array, *, impl: str = "auto", interpret: bool | None = None,
               block_sizes: common.BlockSizes = DEFAULT_BLOCKS) -> jax.Array:
  """x + sigmoid(concat(x, lq) @ w + b - exp(log_alpha) * sigma) * lq.

  Args:
    x: [B, N, D] backbone tokens. lq: [B, N, D] adapter features, x's dtype.
    sigma: [B] the latent's noise level. w: [2D, G], G = D (per-channel gate) or 1 (per token).
    b: [G]. log_alpha: scalar (an array or a Python float).
    impl: "xla" (the reference), "pallas" (the kernels), "auto" (the kernels on a GPU where D fits,
      the reference otherwise).
    interpret: run the Pallas kernels in interpret mode; None = on every backend but a GPU.
    block_sizes: the kernels' tiling (`rows` tokens x `cols` channels per tile, `num_warps`).
  Returns:
    [B, N, D] in x's dtype; differentiable in every argument.
  """
  if not isinstance(block_sizes, common.BlockSizes):
    raise TypeError(f"sigma_gate: block_sizes must be a kernels.common.BlockSizes, got "
                    f"{type(block_sizes).__name__}")
  x, lq, sigma, w, b, log_alpha = (jnp.asarray(a) for a in (x, lq, sigma, w, b, log_alpha))
  _check_inputs(x, lq, sigma, w, b, log_alpha)
  interpret = common.resolve_interpret(interpret)
  impl = common.choose_impl(impl, interpret, _unsupported(x), "sigma_gate")
  if impl == "xla":
    return sigma_gate_reference(x, lq, sigma, w, b, log_alpha)
  n, d = x.shape[1:]
  c_Bx1xG = (b.astype(jnp.float32) - jnp.exp(log_alpha.astype(jnp.float32))
             * sigma.astype(jnp.float32)[:, None])[:, None, :]
  w_x, w_lq = w[:d].astype(x.dtype), w[d:].astype(x.dtype)
  blocks = dataclasses.replace(block_sizes, rows=common.row_block(n, block_sizes.rows))
  # Zero rows are inert: their output (sliced off) is 0 and their cotangent is 0.
  x_p, lq_p = common.pad_rows(x, 1, blocks.rows), common.pad_rows(lq, 1, blocks.rows)
  return _sigma_gate(x_p, lq_p, w_x, w_lq, c_Bx1xG, interpret, blocks)[:, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _sigma_gate(x, lq, w_x, w_lq, c, interpret, blocks):
  return _forward(x, lq, w_x, w_lq, c, interpret, blocks)[0]


def _forward(x, lq, w_x, w_lq, c, interpret, blocks):
  gate = _channel_gate if w_x.shape[1] > 1 else _token_gate
  return gate(x, lq, w_x, w_lq, c, blocks, interpret), (x, lq, w_x, w_lq, c)


def _backward(interpret, blocks, residuals, g):
  x, lq, w_x, w_lq, c = residuals
  if w_x.shape[1] > 1:
    da, gs = _channel_gate_grads(x, lq, g, w_x, w_lq, c, blocks, interpret)
    dx, dlq = _channel_input_grads(g, gs, da, w_x, w_lq, blocks, interpret)
    f32, hi = jnp.float32, common.dot_precision(x.dtype)
    dw_x = jnp.einsum("bnd,bng->dg", x, da, preferred_element_type=f32, precision=hi)
    dw_lq = jnp.einsum("bnd,bng->dg", lq, da, preferred_element_type=f32, precision=hi)
  else:
    dx, dlq, da, dw_x, dw_lq = _token_gate_grads(x, lq, g, w_x, w_lq, c, blocks, interpret)
  dc = da.astype(jnp.float32).sum(axis=1, keepdims=True)
  return dx, dlq, dw_x.astype(w_x.dtype), dw_lq.astype(w_lq.dtype), dc


_sigma_gate.defvjp(_forward, _backward)


def _cols(i, block: int):
  return pl.ds(pl.multiple_of(i * block, block), block)


def _dot(a, b, precision):
  return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


# --- per-channel gate (G = D) -------------------------------------------------------------------

def _gate_logits(x_ref, lq_ref, wx_ref, wlq_ref, c_ref, *, block_k, precision):
  """a = x w_x + lq w_lq + c for one [bn, bg] tile: x_ref, lq_ref [bn, D], w refs [D, bg], c_ref [1, bg]."""
  def body(kk, a):
    ks = _cols(kk, block_k)
    return (a + _dot(x_ref[:, ks], wx_ref[ks, :], precision)
            + _dot(lq_ref[:, ks], wlq_ref[ks, :], precision))
  a0 = jnp.zeros((x_ref.shape[0], wx_ref.shape[1]), jnp.float32) + c_ref[...]
  return lax.fori_loop(0, x_ref.shape[1] // block_k, body, a0)


def _channel_gate_kernel(x_ref, lq_ref, wx_ref, wlq_ref, c_ref, o_ref, *, block_k, precision):
  a = _gate_logits(x_ref, lq_ref, wx_ref, wlq_ref, c_ref, block_k=block_k, precision=precision)
  own = _cols(pl.program_id(0), o_ref.shape[1])
  x, lq = x_ref[:, own].astype(jnp.float32), lq_ref[:, own].astype(jnp.float32)
  o_ref[...] = (x + jax.nn.sigmoid(a) * lq).astype(o_ref.dtype)


def _channel_grads_kernel(x_ref, lq_ref, g_ref, wx_ref, wlq_ref, c_ref, da_ref, gs_ref, *, block_k,
                          precision):
  s = jax.nn.sigmoid(_gate_logits(x_ref, lq_ref, wx_ref, wlq_ref, c_ref, block_k=block_k,
                                  precision=precision))
  own = _cols(pl.program_id(0), da_ref.shape[1])
  g, lq = g_ref[...].astype(jnp.float32), lq_ref[:, own].astype(jnp.float32)
  da_ref[...] = (g * lq * s * (1.0 - s)).astype(da_ref.dtype)
  gs_ref[...] = (g * s).astype(gs_ref.dtype)


def _channel_specs(blocks, d):
  """BlockSpecs for a grid (channel block, batch, row block) over [B, N, D] arrays: a whole-width row
  block, the program's [bn, bc] tile, w's column and row blocks, the bias's column block."""
  block_c = common.pow2_tile(d, blocks.cols) or d
  return dict(
      rows=pl.BlockSpec((None, blocks.rows, d), lambda j, i, t: (i, t, 0)),
      tile=pl.BlockSpec((None, blocks.rows, block_c), lambda j, i, t: (i, t, j)),
      w_cols=pl.BlockSpec((d, block_c), lambda j, i, t: (0, j)),
      w_rows=pl.BlockSpec((block_c, d), lambda j, i, t: (j, 0)),
      c_cols=pl.BlockSpec((None, 1, block_c), lambda j, i, t: (i, 0, j)))


def _channel_call(kernel, inputs, in_specs, num_outputs, blocks, interpret, name):
  """A pallas_call over (channel block, batch, row block) writing num_outputs [B, N, D] tiles in
  the first input's dtype. The channel-block axis comes first because Triton launches grid axis 0
  fastest: the programs that share a row block of x and lq then run together and read it from L2."""
  b, n, d = inputs[0].shape
  specs = _channel_specs(blocks, d)
  block_c = specs["tile"].block_shape[-1]
  return pl.pallas_call(
      functools.partial(kernel, block_k=block_c, precision=common.dot_precision(inputs[0].dtype)),
      grid=(d // block_c, b, n // blocks.rows),
      in_specs=[specs[k] for k in in_specs], out_specs=[specs["tile"]] * num_outputs,
      out_shape=[jax.ShapeDtypeStruct((b, n, d), inputs[0].dtype)] * num_outputs,
      compiler_params=common.triton_params(blocks.num_warps, num_stages=3), interpret=interpret,
      name=name)(*inputs)


def _channel_gate(x, lq, w_x, w_lq, c, blocks, interpret):
  [out] = _channel_call(_channel_gate_kernel, (x, lq, w_x, w_lq, c),
                        ("rows", "rows", "w_cols", "w_cols", "c_cols"), 1, blocks, interpret,
                        "sigma_gate_channel")
  return out


def _channel_gate_grads(x, lq, g, w_x, w_lq, c, blocks, interpret):
  """-> da (the gate logits' cotangent) and g * s, both [B, N, D] in x's dtype."""
  return _channel_call(_channel_grads_kernel, (x, lq, g, w_x, w_lq, c),
                       ("rows", "rows", "tile", "w_cols", "w_cols", "c_cols"), 2, blocks,
                       interpret, "sigma_gate_channel_grads")


def _input_grads_kernel(g_ref, gs_ref, da_ref, wx_ref, wlq_ref, dx_ref, dlq_ref, *, block_k,
                        precision):
  """dx = g + da w_x^T and dlq = g s + da w_lq^T for one tile: da_ref [bn, G], w refs [bd, G]."""
  def body(kk, acc):
    ks = _cols(kk, block_k)
    da = da_ref[:, ks]
    tr = (((1,), (1,)), ((), ()))
    return (acc[0] + lax.dot_general(da, wx_ref[:, ks], tr, precision=precision,
                                     preferred_element_type=jnp.float32),
            acc[1] + lax.dot_general(da, wlq_ref[:, ks], tr, precision=precision,
                                     preferred_element_type=jnp.float32))
  zeros = jnp.zeros(dx_ref.shape, jnp.float32)
  acc_x, acc_lq = lax.fori_loop(0, da_ref.shape[1] // block_k, body, (zeros, zeros))
  dx_ref[...] = (g_ref[...].astype(jnp.float32) + acc_x).astype(dx_ref.dtype)
  dlq_ref[...] = (gs_ref[...].astype(jnp.float32) + acc_lq).astype(dlq_ref.dtype)


def _channel_input_grads(g, gs, da, w_x, w_lq, blocks, interpret):
  """-> dx, dlq [B, N, D]."""
  return _channel_call(_input_grads_kernel, (g, gs, da, w_x, w_lq),
                       ("tile", "tile", "rows", "w_rows", "w_rows"), 2, blocks, interpret,
                       "sigma_gate_input_grads")


# --- per-token gate (G = 1) ---------------------------------------------------------------------

def _row_sum(ref_a, ref_b, ks):
  """sum over the channels ks of ref_a * ref_b, in float32: [bn, 1]."""
  return jnp.sum(ref_a[:, ks].astype(jnp.float32) * ref_b[:, ks].astype(jnp.float32), axis=1,
                 keepdims=True)


def _token_logits(x_ref, lq_ref, wx_ref, wlq_ref, c_ref, block_k, extra=None):
  """a = x . w_x + lq . w_lq + c per row ([bn, 1]); with `extra` = (ref_a, ref_b) also
  sum(ref_a * ref_b) per row, in the same pass over the channels."""
  def body(kk, carry):
    ks = _cols(kk, block_k)
    a = carry[0] + _row_sum(x_ref, wx_ref, ks) + _row_sum(lq_ref, wlq_ref, ks)
    return (a,) if extra is None else (a, carry[1] + _row_sum(*extra, ks))
  zeros = jnp.zeros((x_ref.shape[0], 1), jnp.float32)
  init = (zeros + c_ref[...],) + (() if extra is None else (zeros,))
  return lax.fori_loop(0, x_ref.shape[1] // block_k, body, init)


def _token_gate_kernel(x_ref, lq_ref, wx_ref, wlq_ref, c_ref, o_ref, *, block_k):
  """One row block: x_ref, lq_ref, o_ref [bn, D]; w refs [1, D]; c_ref [1, 1]."""
  (a,) = _token_logits(x_ref, lq_ref, wx_ref, wlq_ref, c_ref, block_k)
  s = jax.nn.sigmoid(a)

  def body(kk, carry):
    ks = _cols(kk, block_k)
    o_ref[:, ks] = (x_ref[:, ks].astype(jnp.float32)
                    + s * lq_ref[:, ks].astype(jnp.float32)).astype(o_ref.dtype)
    return carry
  lax.fori_loop(0, x_ref.shape[1] // block_k, body, 0)


def _token_grads_kernel(x_ref, lq_ref, g_ref, wx_ref, wlq_ref, c_ref, dx_ref, dlq_ref, da_ref,
                        dwx_ref, dwlq_ref, *, block_k):
  """One row block: also writes da [bn, 1] and the block's share of dw_x, dw_lq ([1, D] each)."""
  a, g_dot_lq = _token_logits(x_ref, lq_ref, wx_ref, wlq_ref, c_ref, block_k, (g_ref, lq_ref))
  s = jax.nn.sigmoid(a)
  da = g_dot_lq * s * (1.0 - s)
  da_ref[...] = da

  def body(kk, carry):
    ks = _cols(kk, block_k)
    g = g_ref[:, ks].astype(jnp.float32)
    x, lq = x_ref[:, ks].astype(jnp.float32), lq_ref[:, ks].astype(jnp.float32)
    dx_ref[:, ks] = (g + da * wx_ref[:, ks].astype(jnp.float32)).astype(dx_ref.dtype)
    dlq_ref[:, ks] = (g * s + da * wlq_ref[:, ks].astype(jnp.float32)).astype(dlq_ref.dtype)
    dwx_ref[:, ks] = jnp.sum(x * da, axis=0, keepdims=True)
    dwlq_ref[:, ks] = jnp.sum(lq * da, axis=0, keepdims=True)
    return carry
  lax.fori_loop(0, x_ref.shape[1] // block_k, body, 0)


def _token_specs(blocks, d):
  rows = pl.BlockSpec((None, blocks.rows, d), lambda i, t: (i, t, 0))
  weight = pl.BlockSpec((1, d), lambda i, t: (0, 0))
  bias = pl.BlockSpec((None, 1, 1), lambda i, t: (i, 0, 0))
  return rows, weight, bias


def _token_gate(x, lq, w_x, w_lq, c, blocks, interpret):
  b, n, d = x.shape
  rows, weight, bias = _token_specs(blocks, d)
  return pl.pallas_call(
      functools.partial(_token_gate_kernel, block_k=common.pow2_tile(d, blocks.cols) or d),
      grid=(b, n // blocks.rows), in_specs=[rows, rows, weight, weight, bias], out_specs=rows,
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      compiler_params=common.triton_params(blocks.num_warps), interpret=interpret,
      name="sigma_gate_token")(x, lq, w_x.T, w_lq.T, c)


def _token_gate_grads(x, lq, g, w_x, w_lq, c, blocks, interpret):
  """-> dx, dlq [B, N, D]; da [B, N, 1] (float32); dw_x, dw_lq [D, 1] (float32)."""
  b, n, d = x.shape
  num_blocks = n // blocks.rows
  rows, weight, bias = _token_specs(blocks, d)
  dw_part = pl.BlockSpec((None, None, 1, d), lambda i, t: (i, t, 0, 0))
  dx, dlq, da, dwx_part, dwlq_part = pl.pallas_call(
      functools.partial(_token_grads_kernel, block_k=common.pow2_tile(d, blocks.cols) or d),
      grid=(b, num_blocks), in_specs=[rows, rows, rows, weight, weight, bias],
      out_specs=[rows, rows, pl.BlockSpec((None, blocks.rows, 1), lambda i, t: (i, t, 0)),
                 dw_part, dw_part],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct((b, n, 1), jnp.float32),
                 jax.ShapeDtypeStruct((b, num_blocks, 1, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, num_blocks, 1, d), jnp.float32)],
      compiler_params=common.triton_params(blocks.num_warps), interpret=interpret,
      name="sigma_gate_token_grads")(x, lq, g, w_x.T, w_lq.T, c)
  return dx, dlq, da, dwx_part.sum(axis=(0, 1)).T, dwlq_part.sum(axis=(0, 1)).T
