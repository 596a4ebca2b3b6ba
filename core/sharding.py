"""One device mesh for every run, parameter/batch shardings, a shard_map helper, multi-host start-up.

Mesh axes are ("data", "fsdp", "model"). Parameters carry *logical* axis names declared where the
layer creates them (`core.nn.partitioning`, flax's `nn.with_logical_partitioning`); parameters
without names get them from path/shape rules (`PARAM_LOGICAL_AXES`, the fallback). The config's
`sharding.logical_axis_rules` map logical names onto mesh axes, for parameters and for the
activations the layers constrain (`nn.with_logical_constraint`, active inside `mesh_context`); arrays
smaller than `min_fsdp_size` stay replicated (gathering them costs more than storing them). Batches
shard their leading dimension over ("data", "fsdp"). `jax.jit` with these shardings is what pjit
became. Pallas kernels, which XLA cannot partition, run under `shard_kernel`.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# (regex on the '/'-joined parameter path, logical axes of the array); first match wins. Paths of
# optimiser-state leaves end with the parameter's path, so the same rules shard Adam's moments.
PARAM_LOGICAL_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"(^|/)embedding$", ("vocab", "embed")),
    (r"(^|/)kernel$", ("embed", "mlp")),          # Dense [in, out]
    (r"(^|/)kernel$", (None, None, "embed", "mlp")),  # Conv [kh, kw, in, out]
    (r"(^|/)lora_a$", ("embed", None)),
    (r"(^|/)lora_b$", (None, "mlp")),
)

# logical axis -> mesh axis, a tuple of them, or None (replicated along it). "embed" is a parameter's
# model-width axis (FSDP shards it); activations are named "batch", "length", "heads", "mlp".
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
)


def axis_rules(config) -> tuple[tuple[str, Any], ...]:
  """The config's `sharding.logical_axis_rules` (the defaults when absent), as flax expects them."""
  shard = config.get("sharding") or {}
  rules = shard.get("logical_axis_rules", DEFAULT_LOGICAL_AXIS_RULES)
  return tuple((str(name), tuple(axis) if isinstance(axis, (list, tuple)) else axis)
               for name, axis in rules)


def mesh_context(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_AXIS_RULES):
  """`jax.set_mesh(mesh)` and flax's logical axis rules: under it, jitted code sees the mesh (for
  `shard_kernel`) and the layers' activation constraints take effect."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(tuple(rules)))
  return stack


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves {data, fsdp, model} sizes, where at most one -1 takes the remaining devices."""
  unknown = set(mesh_cfg) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh {dict(mesh_cfg)}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh {dict(mesh_cfg)}: sizes must be positive or -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(mesh_cfg)} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh {dict(mesh_cfg)} needs {int(np.prod(sizes))} devices, "
                     f"but {num_devices} are in use")
  return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "model") mesh over `devices` (default: all devices of all hosts)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(dict(mesh_cfg or {"data": -1}), len(devices))
  # Auto axes: XLA's partitioner propagates shardings from the jit boundaries (newer jax defaults
  # jax.make_mesh to Explicit axes, which changes how every op must be annotated).
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == jax.device_count():
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def declared_axes(params: Any) -> dict[str, tuple[str | None, ...]]:
  """{parameter path: logical axis names} of the parameters a layer declared names for (boxed by
  `nn.with_logical_partitioning`; abstract or concrete)."""
  specs = nn.get_partition_spec(params)
  out = {}
  for path, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]:
    if isinstance(spec, P) and len(spec):
      out[_path_str(path)] = tuple(spec)
  return out


def logical_axes(path: str, shape: Sequence[int],
                 declared: Mapping[str, tuple[str | None, ...]] | None = None) -> tuple[str | None, ...]:
  """Logical axis names of a parameter-shaped array: the names its layer declared (`declared`, by
  parameter path; an optimiser-state leaf's path ends with its parameter's path), else the first
  matching `PARAM_LOGICAL_AXES` rule (the fallback), else all None."""
  best = None
  for name, axes in (declared or {}).items():
    if len(axes) == len(shape) and (path == name or path.endswith("/" + name)):
      best = max(best or "", name, key=len)
  if best is not None:
    return tuple(declared[best])
  for pattern, axes in PARAM_LOGICAL_AXES:
    if len(axes) == len(shape) and re.search(pattern, path):
      return axes
  return (None,) * len(shape)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, *, min_fsdp_size: int = 2**14,
             rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_AXIS_RULES,
             declared: Mapping[str, tuple[str | None, ...]] | None = None) -> P:
  """PartitionSpec of one parameter-shaped array.

  A mesh axis (or tuple of them) is used only if it divides the dimension and is larger than 1, and
  each mesh axis at most once; arrays with fewer than `min_fsdp_size` elements are replicated.
  """
  if int(np.prod(shape, dtype=np.int64)) < min_fsdp_size:
    return P()
  table = dict(rules)
  used, spec = set(), []
  for dim, name in zip(shape, logical_axes(path, shape, declared)):
    axis = table.get(name) if name is not None else None
    axes = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    size = int(np.prod([mesh.shape[a] for a in axes], dtype=np.int64))
    if not axes or used & set(axes) or size == 1 or dim % size:
      spec.append(None)
    else:
      spec.append(axis)
      used.update(axes)
  return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, *, min_fsdp_size: int = 2**14,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_LOGICAL_AXIS_RULES,
                   declared: Mapping[str, tuple[str | None, ...]] | None = None) -> Any:
  """NamedShardings for every array of a (possibly abstract) pytree, by path and shape; `declared`
  (`declared_axes` of the parameters) takes precedence over the path rules."""
  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, spec_for(_path_str(path), shape, mesh, min_fsdp_size=min_fsdp_size,
                                        rules=rules, declared=declared))
  return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ("data", "fsdp"); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_size_per_process(global_batch_size: int, mesh: Mesh) -> int:
  """This host's share of the global batch; the batch must split evenly over the batch shards."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch_size % shards:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{shards} batch shards of mesh {dict(mesh.shape)}")
  if global_batch_size % jax.process_count():
    raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                     f"{jax.process_count()} processes")
  return global_batch_size // jax.process_count()


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles each host's slice (numpy, leading dim = per-host batch) into global sharded arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def shard_kernel(fn: Callable, args: Sequence[jax.Array], dims: Sequence[tuple[str | None, ...]],
                 out_dims: tuple[str | None, ...]) -> jax.Array:
  """fn(*args) for a kernel XLA cannot partition (a Pallas call), under `jax.shard_map` over the mesh
  in context (`jax.set_mesh`, as `mesh_context` sets it), so each device runs it on its own shard.

  dims: per argument, one entry per dimension: "batch" (split over the batch axes ("data", "fsdp")),
  "heads" (split over "model"), or "length" or None (whole on every device: a kernel reduces over
  its tokens); out_dims likewise for the output.
  An axis that does not divide its dimension is left whole (correct, merely redundant). Without a
  mesh in context, or on a one-device mesh, fn(*args) is called as it is.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*args)
  mesh_axes = {"batch": BATCH_AXES, "heads": ("model",), "length": ()}
  sizes = dict(mesh.shape)

  def fits(name, size):
    axes = mesh_axes[name] if name is not None else ()
    n = int(np.prod([sizes.get(a, 1) for a in axes], dtype=np.int64))
    return bool(axes) and n > 1 and size % n == 0

  # A logical dim is split only where it divides every array that carries it (their shards must
  # agree): batch and heads are the same sizes in the inputs and the output of a kernel.
  names = {n for d in (*dims, out_dims) for n in d if n is not None}
  unknown = names - set(mesh_axes)
  if unknown:
    raise ValueError(f"shard_kernel: unknown dims {sorted(unknown)}; expected 'batch', 'heads', 'length' or None")
  extent = {n: [a.shape[i] for a, d in zip(args, dims) for i, m in enumerate(d) if m == n] for n in names}
  split = {n for n in names if all(fits(n, e) for e in extent[n])}

  def spec(d):
    return P(*[(mesh_axes[n] if len(mesh_axes[n]) > 1 else mesh_axes[n][0]) if n in split else None
               for n in d])

  # check_vma off: Pallas calls carry no varying-manual-axes annotations.
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(d) for d in dims),
                       out_specs=spec(out_dims), check_vma=False)(*args)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts multi-host JAX. Arguments > environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID) > the cluster's own environment (SLURM, Open MPI, ... detected by JAX).

  Does nothing for a single process with no coordinator. On CPU the collectives go through gloo.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  cluster = any(v in os.environ for v in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"))
  if coordinator_address is None and not cluster:
    if num_processes not in (None, 1):
      raise ValueError(f"num_processes={num_processes} needs a coordinator address "
                       "(--coordinator_address or JAX_COORDINATOR_ADDRESS)")
    return
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
