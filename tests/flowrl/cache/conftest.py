"""Fresh randomness per test, with the seed printed so that a failure can be replayed."""
import numpy as np
import pytest


@pytest.fixture
def rng():
  seed = int(np.random.SeedSequence().generate_state(1)[0])
  print(f"seed = {seed}")
  return np.random.default_rng(seed)
