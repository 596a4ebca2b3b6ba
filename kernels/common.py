"""What the Pallas kernels share: the impl switch, interpret-mode resolution, GPU lowering parameters.

GPU lowering: the kernels are written as blocked Pallas programs (BlockSpecs over a grid, 2-D tiles,
`jnp.dot`) and lowered through the Triton backend, chosen explicitly with `pltriton.CompilerParams`: jax
0.10 and 0.11 default `pl.pallas_call` to Mosaic GPU, whose kernels are written differently
(warpgroup semantics, `plgpu.kernel`). Triton needs every tile dimension to be a power of two, so
the kernels' `*_unsupported` functions check the shapes and `impl="auto"` falls back to the reference
where they do not fit. On a CPU, `interpret=True` runs the same program through XLA.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pltriton

IMPLS = ("auto", "xla", "pallas")
FLOAT_DTYPES = tuple(jnp.dtype(t) for t in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64))
KERNEL_DTYPES = FLOAT_DTYPES[:3]  # what the compiled kernels take; float64 runs on the reference


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """A kernel's tiling, passed as an argument (frozen, so jit can key its cache on it).

  rows: tokens per tile, a power of two in [16, 1024] (Triton's dot tiles need >= 16).
  cols: output channels per tile and the matmuls' reduction step (sigma_gate), a power of two in
    [16, 1024].
  num_warps: Triton warps per program, a power of two in [1, 32].
  """
  rows: int
  cols: int = 128
  num_warps: int = 4

  def __post_init__(self):
    for name, lo, hi in (("rows", 16, 1024), ("cols", 16, 1024), ("num_warps", 1, 32)):
      value = getattr(self, name)
      if not isinstance(value, int) or not is_pow2(value) or not lo <= value <= hi:
        raise ValueError(f"BlockSizes.{name}={value!r}; expected a power of two in [{lo}, {hi}]")


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def resolve_interpret(interpret: bool | None) -> bool:
  """None -> interpret everywhere but on a GPU (Pallas compiles only for GPUs and TPUs here)."""
  return not on_gpu() if interpret is None else bool(interpret)


def choose_impl(impl: str, interpret: bool, unsupported: str | None, name: str) -> str:
  """Resolves impl to "xla" or "pallas".

  Args:
    impl: one of IMPLS.
    interpret: whether the kernel would run in interpret mode.
    unsupported: why the compiled kernel cannot take these inputs on this backend, or None.
    name: the kernel's name, for error messages.
  """
  if impl not in IMPLS:
    raise ValueError(f"{name}: impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    # Interpret mode is a correctness tool, far slower than the reference: auto never picks it.
    return "pallas" if on_gpu() and not interpret and unsupported is None else "xla"
  if impl == "pallas" and not interpret:
    if not on_gpu():
      raise ValueError(f"{name}: impl='pallas' compiles only for a GPU, but JAX's backend is "
                       f"{jax.default_backend()!r}; pass interpret=True (or None) to run it on a CPU")
    if unsupported is not None:
      raise ValueError(f"{name}: the Pallas kernel cannot take these inputs: {unsupported}; "
                       "use impl='auto' or 'xla'")
  return impl


def check_float(name: str, x: jax.Array) -> None:
  if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
    raise TypeError(f"{name} must be a float array (float32, bfloat16, float16 or float64), "
                    f"got {x.dtype}")


def is_pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def pow2_tile(n: int, largest: int, smallest: int = 16) -> int | None:
  """The largest power of two in [smallest, largest] dividing n, or None."""
  t = largest
  while t >= smallest:
    if n % t == 0:
      return t
    t //= 2
  return None


def row_block(n: int, largest: int) -> int:
  """Rows per block: the next power of two >= n, clipped to [16, largest] (Triton's minimum dot tile)."""
  return max(16, min(largest, 1 << max(0, n - 1).bit_length()))


def pad_rows(x: jax.Array, axis: int, multiple: int) -> jax.Array:
  """Zero-pads `axis` up to a multiple, so every block the kernels touch is in bounds (Triton does
  not mask blocks that run past an array's end)."""
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def largest_divisor_at_most(n: int, cap: int) -> int:
  return max(c for c in range(1, max(1, min(n, cap)) + 1) if n % c == 0)


def dot_precision(dtype) -> lax.Precision | None:
  """float32 inputs get exact float32 products; 16-bit inputs, whose float32 intermediates carry
  only 16-bit information, get TF32 tensor cores (Triton's default for float32 dots)."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def triton_params(num_warps: int = 4, num_stages: int = 2) -> pltriton.CompilerParams:
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
