"""Random parameters without running a module's initialisers (they compile slowly on CPU)."""
import jax
import jax.numpy as jnp
from flax.core import meta


def random_params(module, rng, *args, scale=0.3, **kwargs):
  """module's "params" with every leaf drawn from N(0, scale^2), for inputs like *args, **kwargs."""
  # A closure keeps non-array arguments (grid sizes, batch) static.
  # Unboxed: the layers' logical axis names (core/nn/partitioning.py) are not needed here.
  shapes = meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"])
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)
