import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from core.nn.flow_mlp import FlowMLP
from tests.core.nn.random_params import random_params


def test_shapes_and_conditioning(rng):
  x = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=6), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=6))
  model = FlowMLP(width=32, depth=2, num_classes=3)
  params = {"params": random_params(model, rng, x, t, y)}
  v = model.apply(params, x, t, y)
  assert v.shape == x.shape
  assert not np.allclose(v, model.apply(params, x, 1 - t, y), atol=1e-5)
  assert not np.allclose(v, model.apply(params, x, t, (y + 1) % 3), atol=1e-5)
  np.testing.assert_array_equal(model.apply(params, x, t),
                                model.apply(params, x, t, jnp.full((6,), 3)))  # None = null
  with pytest.raises(ValueError, match=r"t_B must have shape \[B\] = \(6,\)"):
    model.apply(params, x, t[:, None], y)


def test_fits_a_fixed_batch(rng, key):
  """A few Adam steps on one batch of the flow-matching regression lower the loss a lot."""
  x0 = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=64), jnp.float32)
  x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
  model = FlowMLP(width=32, depth=1)
  tx = optax.adam(3e-3)
  loss = lambda p: jnp.mean((model.apply(p, x_t, t) - (eps - x0)) ** 2)

  @jax.jit
  def train(p):
    def step(carry, _):
      p, s = carry
      loss_value, g = jax.value_and_grad(loss)(p)
      u, s = tx.update(g, s)
      return (optax.apply_updates(p, u), s), loss_value
    return jax.lax.scan(step, (p, tx.init(p)), length=150)[1]

  losses = train(model.init(key, x_t, t))
  assert losses[-1] < 0.5 * losses[0]
