"""LoRA (Hu et al., arXiv 2106.09685) for Linen models used functionally, base parameters untouched.

A Dense kernel W [in, out] is adapted as W + scale * A @ B with A [in, r] and B [r, out]. The
factors live in their own pytree, mirroring the module paths of the params:

    {"block_0": {"attn": {"qkv": {"lora_a": A, "lora_b": B}}}, ...}

Scale convention: scale = alpha / r (Sec. 4.1 of the paper); scale = 1 is alpha = r. B starts at 0,
so an adapted model starts equal to its base. `apply_with_lora` runs the unmerged forward
x W + b + scale * (x A) B by intercepting nn.Dense / nn.DenseGeneral calls, so model code needs no
changes; `merge` folds the factors into the kernels for inference and `unmerge` takes them out.

Convolutions (`init_lora(..., convs=True)`): a kernel [kh, kw, in, out] is adapted as the Dense on
its flattened receptive field, W + scale * reshape(A @ B) with A [kh kw in, r] (LoRA's Conv2d
does the same). Those factors are used through `merge`, which is differentiable in them: train with
`model.apply({"params": merge(params, lora_params)}, ...)`.
"""
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

Path = tuple[str, ...]


def _kernels(params: Any, convs: bool = False) -> dict[Path, jax.Array]:
  """Module path -> `kernel`: the 2-D ones (Dense layers), and with convs the 4-D ones too."""
  ndims = (2, 4) if convs else (2,)
  return {path[:-1]: w for path, w in traverse_util.flatten_dict(params).items()
          if path[-1] == "kernel" and jnp.ndim(w) in ndims}


def _factors(lora_params: Any) -> dict[Path, tuple[jax.Array, jax.Array]]:
  """Module path -> (A [in, r], B [r, out])."""
  flat = traverse_util.flatten_dict(lora_params)
  paths = {path[:-1] for path in flat}
  if any(path[-1] not in ("lora_a", "lora_b") for path in flat) or len(flat) != 2 * len(paths):
    raise ValueError(f"lora_params must hold exactly 'lora_a' and 'lora_b' under each adapted "
                     f"module; got leaves {sorted('/'.join(p) for p in flat)[:12]}")
  return {p: (flat[p + ("lora_a",)], flat[p + ("lora_b",)]) for p in paths}


def init_lora(params: Any, patterns: str | Sequence[str], rank: int, key: jax.Array,
              convs: bool = False) -> dict:
  """LoRA factors for every Dense kernel whose '/'-joined path matches a pattern.

  Args:
    params: the model's params (the "params" collection), e.g. {"block_0": {"attn": ...}}.
    patterns: regexes searched (re.search) in paths like "block_0/attn/qkv/kernel"; only 2-D
      kernels (nn.Dense, nn.DenseGeneral with one input and one output axis) are candidates.
    rank: r.
    key: PRNG key for A.
    convs: also adapt 4-D conv kernels [kh, kw, in, out] (A is then [kh kw in, r]; use `merge`).
  Returns:
    {module path...: {"lora_a": A [in, r] ~ N(0, 1/in), "lora_b": B [r, out] = 0}} in the kernels'
    dtype.
  Raises:
    ValueError: a pattern matches no kernel (the message lists some that exist).
  """
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  kernels = _kernels(params, convs)
  names = {path: "/".join(path + ("kernel",)) for path in kernels}
  chosen = set()
  for pattern in patterns:
    hits = {path for path, name in names.items() if re.search(pattern, name)}
    if not hits:
      raise ValueError(f"LoRA pattern {pattern!r} matches no Dense kernel; some kernel paths: "
                       f"{sorted(names.values())[:12]}")
    chosen |= hits
  chosen = sorted(chosen)
  lora = {}
  for k, path in zip(jax.random.split(key, len(chosen)), chosen):
    w = kernels[path]
    d_in, d_out = math.prod(w.shape[:-1]), w.shape[-1]
    lora[path + ("lora_a",)] = jax.random.normal(k, (d_in, rank), w.dtype) / jnp.sqrt(d_in)
    lora[path + ("lora_b",)] = jnp.zeros((rank, d_out), w.dtype)
  return traverse_util.unflatten_dict(lora)


def apply_with_lora(model: nn.Module, params: Any, lora_params: Any, *args, scale=1.0, **kwargs):
  """model.apply({"params": params}, *args, **kwargs) with every adapted Dense computing
  x W + b + scale * (x A) B.

  Base params are used as they are; gradients can be taken with respect to lora_params alone.
  Raises ValueError when a LoRA entry names a module that the call never ran as a Dense (a stale or
  mismatched LoRA tree).
  """
  factors = _factors(lora_params)
  used = set()

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    path = tuple(module.path)
    if (context.method_name != "__call__" or path not in factors
        or not isinstance(module, (nn.Dense, nn.DenseGeneral))):
      return next_fun(*call_args, **call_kwargs)
    y = next_fun(*call_args, **call_kwargs)
    x = call_args[0] if call_args else call_kwargs["inputs"]
    if isinstance(module, nn.DenseGeneral):
      if module.batch_dims:
        raise NotImplementedError(f"LoRA on DenseGeneral with batch_dims ({'/'.join(path)})")
      axis = module.axis if isinstance(module.axis, int) else module.axis[0]
      x = jnp.moveaxis(x, axis, -1)
    a, b = factors[path]
    used.add(path)
    delta = (x.astype(y.dtype) @ a.astype(y.dtype)) @ b.astype(y.dtype)
    return y + (scale * delta).astype(y.dtype)

  with nn.intercept_methods(interceptor):
    out = model.apply({"params": params}, *args, **kwargs)
  unused = sorted("/".join(p) for p in set(factors) - used)
  if unused:
    raise ValueError(f"LoRA factors for modules the model never called as a Dense: {unused[:12]}")
  return out


def _add_product(params: Any, lora_params: Any, scale) -> dict:
  flat = traverse_util.flatten_dict(params)
  for path, (a, b) in _factors(lora_params).items():
    name = path + ("kernel",)
    if name not in flat:
      raise ValueError(f"LoRA factors for {'/'.join(path)} but params have no such kernel")
    w = flat[name]
    # HIGHEST: the default GPU precision (TF32) would make merged and unmerged forwards differ.
    ab = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)
    if ab.size != w.size or ab.shape[-1] != w.shape[-1]:
      raise ValueError(f"LoRA factors for {'/'.join(path)} give a {ab.shape} update for its kernel "
                       f"{w.shape}")
    flat[name] = (w.astype(jnp.float32) + scale * ab.reshape(w.shape)).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)


def merge(params: Any, lora_params: Any, scale=1.0) -> dict:
  """params with each adapted kernel replaced by W + scale * A @ B (other leaves as they are)."""
  return _add_product(params, lora_params, scale)


def unmerge(merged: Any, lora_params: Any, scale=1.0) -> dict:
  """The inverse of `merge` (up to float rounding): W - scale * A @ B."""
  return _add_product(merged, lora_params, -scale)
