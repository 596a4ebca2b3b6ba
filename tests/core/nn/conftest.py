"""Fresh randomness per test, with the seed printed so that a failure can be replayed."""
import jax
import numpy as np
import pytest


@pytest.fixture
def seed():
  s = int(np.random.SeedSequence().generate_state(1)[0])
  print(f"seed = {s}")
  return s


@pytest.fixture
def rng(seed):
  return np.random.default_rng(seed)


@pytest.fixture
def key(seed):
  return jax.random.key(seed)
