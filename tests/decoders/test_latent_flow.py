"""decoders/latent_flow.py: the early-exit grid and sampler against the exact flow of a point mass,
and the latent task's config checks."""
import jax.numpy as jnp
import numpy as np
import pytest

from core import flow, registry
from decoders import latent_flow
from experiments.configs import pid_latent


@pytest.mark.parametrize("steps, shift", [(10, 1.0), (7, 3.0)])
def test_exit_grid_cuts_the_full_grid_at_sigma_exit(steps, shift):
  full = np.asarray(flow.time_grid(steps, shift=shift))
  np.testing.assert_array_equal(latent_flow.exit_grid(steps, shift, 0.0), full)
  for sigma in (0.2, 0.4, 0.6, float(full[3])):
    grid = latent_flow.exit_grid(steps, shift, sigma)
    nfe = int(np.sum(full > sigma))
    assert len(grid) == nfe + 1 and grid[-1] == np.float32(sigma)
    np.testing.assert_array_equal(grid[:-1], full[:nfe])
  with pytest.raises(ValueError, match="sigma_exit=1.0"):
    latent_flow.exit_grid(steps, shift, 1.0)


def test_early_exit_hands_over_the_noisy_latent_at_sigma_exit(rng):
  """For a point mass at c the exact velocity is (x - c) / t, along which Euler is exact: stopping at
  sigma gives (1 - sigma) c + sigma x_T, with sigma_lat = sigma."""
  c = jnp.asarray(rng.normal(size=(1, 2, 2, 4)), jnp.float32)
  x_T = jnp.asarray(rng.normal(size=(3, 2, 2, 4)), jnp.float32)
  velocity = lambda x, t: (x - c) / t[:, None, None, None]
  for sigma in (0.0, 0.25, 0.6):
    z, sigma_lat, nfe = latent_flow.early_exit(velocity, x_T, 12, 2.0, sigma)
    np.testing.assert_allclose(z, (1 - sigma) * c + sigma * x_T, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(sigma_lat, np.full(3, sigma, np.float32))
    assert nfe == int(np.sum(np.asarray(flow.time_grid(12, shift=2.0)) > sigma))


def test_latent_config_checks():
  import experiments.tasks  # noqa: F401
  config = pid_latent.get_config("smoke")
  registry.check(config)
  config.data.random_flip = True
  with pytest.raises(ValueError, match="without random flips"):
    registry.check(config)
