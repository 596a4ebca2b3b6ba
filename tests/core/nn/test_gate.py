"""core.nn.SigmaGate: the paper's initialisation, the reference formula, and the kernel sharded over
the batch of the mesh in context (8 fake devices, interpret mode)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import sharding
from core.nn import SigmaGate
from kernels.sigma_gate import sigma_gate_reference


def _inputs(rng, b=8, n=16, d=32):
  x = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
  lq = jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32)
  sigma = jnp.asarray(rng.uniform(0, 1, size=(b,)), jnp.float32)
  return x, lq, sigma


@pytest.mark.parametrize("kind", ["channel", "token"])
def test_init_and_formula(rng, kind):
  x, lq, sigma = _inputs(rng)
  gate = SigmaGate(kind=kind, impl="xla")
  params = gate.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), x, lq, sigma)["params"]
  g = x.shape[-1] if kind == "channel" else 1
  assert params["w"].shape == (2 * x.shape[-1], g) and np.all(np.asarray(params["b"]) == 2.0)
  np.testing.assert_allclose(np.exp(float(params["log_alpha"])), 5.0, rtol=1e-6)
  assert 0.002 < float(np.std(params["w"])) < 0.02            # N(0, 0.01^2)
  out = gate.apply({"params": params}, x, lq, sigma)
  want = sigma_gate_reference(x, lq, sigma, params["w"], params["b"], params["log_alpha"])
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="kind must be one of"):
    SigmaGate(kind="pixel").init(jax.random.PRNGKey(0), x, lq, sigma)


def test_kernel_runs_per_batch_shard_under_the_mesh(rng):
  x, lq, sigma = _inputs(rng)
  gate = SigmaGate(kind="channel", impl="pallas")
  params = gate.init(jax.random.PRNGKey(0), x, lq, sigma)["params"]
  ct = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  loss = lambda p, x, lq, s: jnp.sum(gate.apply({"params": p}, x, lq, s) * ct)
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  want_value, want_grads = grad(params, x, lq, sigma)
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1})
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
  args = (params, *(jax.device_put(a, batch) for a in (x, lq, sigma)))
  with jax.set_mesh(mesh):
    value, grads = grad(*args)
    hlo = grad.lower(*args).compile().as_text()
  assert "all-gather" not in hlo
  # The loss sums 4096 terms of either sign in another order on 8 devices: rounding of order
  # eps * sum|terms| (its value may cancel to far below that sum).
  terms = np.abs(np.asarray(gate.apply({"params": params}, x, lq, sigma) * ct)).sum()
  np.testing.assert_allclose(float(value), float(want_value), rtol=0,
                             atol=8 * np.finfo(np.float32).eps * terms)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
