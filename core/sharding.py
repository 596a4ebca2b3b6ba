"""One device mesh for every run, parameter/batch shardings, a shard_map helper, multi-host start-up.

Mesh axes are ("data", "fsdp", "model"). Parameters get *logical* axis names from path/shape rules
(`PARAM_LOGICAL_AXES`), which `logical_axis_rules` maps onto mesh axes; arrays smaller than
`min_fsdp_size` stay replicated (gathering them costs more than storing them). Batches shard their
leading dimension over ("data", "fsdp"). `jax.jit` with these shardings is what pjit became.
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
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

# logical axis -> mesh axis (or None = replicated along it).
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
)


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


def logical_axes(path: str, shape: Sequence[int]) -> tuple[str | None, ...]:
  """Logical axis names of a parameter from `PARAM_LOGICAL_AXES`; all None when no rule matches."""
  for pattern, axes in PARAM_LOGICAL_AXES:
    if len(axes) == len(shape) and re.search(pattern, path):
      return axes
  return (None,) * len(shape)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, *, min_fsdp_size: int = 2**14,
             rules: Sequence[tuple[str, str | None]] = DEFAULT_LOGICAL_AXIS_RULES) -> P:
  """PartitionSpec of one parameter-shaped array.

  A mesh axis is used only if it divides the dimension and has size > 1, and each mesh axis at most
  once; arrays with fewer than `min_fsdp_size` elements are replicated.
  """
  if int(np.prod(shape, dtype=np.int64)) < min_fsdp_size:
    return P()
  table = dict(rules)
  used, spec = set(), []
  for dim, name in zip(shape, logical_axes(path, shape)):
    axis = table.get(name) if name is not None else None
    if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, *, min_fsdp_size: int = 2**14,
                   rules: Sequence[tuple[str, str | None]] = DEFAULT_LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for every array of a (possibly abstract) pytree, by path and shape."""
  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, spec_for(_path_str(path), shape, mesh,
                                        min_fsdp_size=min_fsdp_size, rules=rules))
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


def shard_map(fn: Callable, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
  """`jax.shard_map` for kernels that XLA cannot partition (Pallas calls).

  Typical specs: `batch_spec(4, head_axis=2)` for [B, N, H, D] attention inputs. The varying-manual-axes
  check is off because Pallas calls carry no vma annotations.
  """
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def batch_spec(ndim: int, *, head_axis: int | None = None) -> P:
  """PartitionSpec that splits dim 0 over the batch axes and, optionally, `head_axis` over "model"."""
  spec = [None] * ndim
  spec[0] = BATCH_AXES
  if head_axis is not None:
    spec[head_axis] = "model"
  return P(*spec)


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
