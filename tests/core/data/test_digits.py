"""The `digits` builder against scikit-learn's own arrays."""
import numpy as np
import pytest
import sklearn.datasets

import core.data
from core.data import digits
from core.data import pipeline


@pytest.mark.parametrize('resolution', [16, 32])
def test_digits_match_sklearn(data_dir, resolution):
  sk = sklearn.datasets.load_digits()
  factor = resolution // 8
  seen = []
  for split, n in (('train', 1500), ('test', 297)):
    arrays = pipeline.InMemorySource(core.data.load(
        'digits', split, config=f'r{resolution}', data_dir=data_dir)).arrays
    image = arrays['image']
    assert image.shape == (n, resolution, resolution, 1)
    assert image.dtype == np.uint8
    assert image.max() == 255 and image.min() == 0
    index = arrays['index']
    np.testing.assert_array_equal(arrays['label'], sk.target[index])
    # Independent nearest upsampling: a Kronecker product with a block of ones.
    expected = np.stack([
        np.kron(np.rint(sk.images[i] * 255 / 16), np.ones((factor, factor)))
        for i in index])
    np.testing.assert_array_equal(image[..., 0], expected)
    # And the documented inverse recovers sklearn's 0..16 values.
    recovered = np.rint(image[:, ::factor, ::factor, 0] / 255 * 16)
    np.testing.assert_array_equal(recovered, sk.images[index])
    seen.append(index)
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(1797))


def test_split_indices_are_a_fixed_partition():
  first, second = digits.split_indices(), digits.split_indices()
  for split in first:
    np.testing.assert_array_equal(first[split], second[split])
  assert len(first['train']) == digits.NUM_TRAIN
  assert not set(first['train']) & set(first['test'])
  # The test split holds every class, so per-class metrics are defined.
  sk = sklearn.datasets.load_digits()
  assert set(sk.target[first['test']]) == set(range(10))


def test_upsample_keeps_the_17_grey_levels(rng):
  image_nx8x8 = rng.integers(0, 17, (4, 8, 8))
  up = digits.upsample(image_nx8x8, 32)
  assert up.shape == (4, 32, 32, 1) and up.dtype == np.uint8
  assert set(np.unique(up)) <= {int(round(v * 255 / 16)) for v in range(17)}
