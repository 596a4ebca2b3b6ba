"""Logical axis names declared where parameters and activations are made (as the Flax examples and
maxdiffusion do): `core.sharding` maps them onto the mesh with the config's `logical_axis_rules`.

Parameter names: "embed" (the model width; FSDP shards it), "mlp" (an MLP's hidden width), "heads"
(attention's head-major width), "vocab". Activation names: "batch", "length", "heads", "mlp".
A Dense from `dense` has kernel [in, out] named `axes` and bias [out] named (axes[1],): an MLP's up
projection is ("embed", "mlp"), its down projection ("mlp", "embed"), so with a model axis the two
are split on opposite dimensions (Megatron's column- then row-parallel pair, one all-reduce).
"""
from __future__ import annotations

import jax
from flax import linen as nn

Axes = tuple[str | None, ...]


def dense(features: int, axes: tuple[str | None, str | None], *,
          kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.zeros_init(),
          **kwargs) -> nn.Dense:
  """nn.Dense whose kernel and bias carry logical axis names (boxed by `nn.with_logical_partitioning`;
  `core.train` unboxes them and shards by the names)."""
  return nn.Dense(features, kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                  bias_init=nn.with_logical_partitioning(bias_init, axes[1:]), **kwargs)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """Sharding constraint of an activation by logical names; a no-op outside `sharding.mesh_context`."""
  return nn.with_logical_constraint(x, axes)
