"""Per-example image transforms."""
import numpy as np
import pytest

import core.data


def _example(rng):
  return {'image': rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
          'label': np.int64(rng.integers(10))}


def test_random_flip_mirrors_half_the_time(rng):
  example = _example(rng)
  flips = 0
  for _ in range(400):
    out = core.data.random_flip(example, rng)
    assert out['label'] == example['label']
    if np.array_equal(out['image'], example['image'][:, ::-1]):
      flips += 1
    else:
      np.testing.assert_array_equal(out['image'], example['image'])
  # Binomial(400, 1/2) leaves (150, 250) on 6.5e-7 of the draws, within the 1e-6 budget.
  assert 150 < flips < 250


def test_to_float_maps_bytes_to_unit_interval(rng):
  example = _example(rng)
  example['image'][0, 0] = [0, 255, 128]
  out = core.data.to_float(example, rng)
  assert out['image'].dtype == np.float32
  np.testing.assert_allclose(out['image'], example['image'] / 127.5 - 1, atol=1e-6)
  np.testing.assert_allclose(out['image'][0, 0], [-1, 1, 128 / 127.5 - 1], atol=1e-6)
  with pytest.raises(ValueError, match='uint8'):
    core.data.to_float(out, rng)


def test_compose_applies_in_order_with_one_rng(rng):
  example = _example(rng)
  both = core.data.compose(core.data.random_flip, core.data.to_float)
  seed = int(rng.integers(2**31))
  expected = core.data.to_float(
      core.data.random_flip(example, np.random.default_rng(seed)), None)
  np.testing.assert_array_equal(both(example, np.random.default_rng(seed))['image'],
                                expected['image'])
