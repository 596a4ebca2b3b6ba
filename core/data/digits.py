"""`digits`: scikit-learn's bundled 8x8 handwritten digits, upsampled.

sklearn's `load_digits` holds 1797 images with integer values 0..16. Each is
scaled to 0..255 (round(v * 255 / 16)) and upsampled by nearest neighbour: every
source pixel becomes an (R/8) x (R/8) block. Nearest keeps the 17 grey levels
and is exactly invertible (take every (R/8)-th pixel, then round(u * 16 / 255)).

BuilderConfigs `r16` and `r32` set the resolution R. Splits are a fixed
permutation of the 1797 indices (seed `SPLIT_SEED`): the first `NUM_TRAIN` =
1500 are `train`, the remaining 297 are `test`, in permutation order.
Features: `image` uint8 [R, R, 1], `label` ClassLabel(10), `index` int32 (the
row of sklearn's arrays the example comes from).
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from core.data import tfds_util

NUM_EXAMPLES = 1797
NUM_TRAIN = 1500
SPLIT_SEED = 0
MAX_VALUE = 16  # sklearn's digits are integers in 0..MAX_VALUE.


def split_indices() -> dict[str, np.ndarray]:
  """sklearn row indices of each split, in stored order."""
  perm = np.random.default_rng(SPLIT_SEED).permutation(NUM_EXAMPLES)
  return {'train': perm[:NUM_TRAIN], 'test': perm[NUM_TRAIN:]}


def upsample(image_nx8x8: np.ndarray, resolution: int) -> np.ndarray:
  """sklearn digits [N, 8, 8] in 0..16 -> uint8 [N, R, R, 1] in 0..255."""
  factor = resolution // 8
  scaled = np.rint(image_nx8x8 * (255 / MAX_VALUE)).astype(np.uint8)
  return scaled.repeat(factor, axis=1).repeat(factor, axis=2)[..., None]


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
  resolution: int = 16


class Digits(tfds_util.Builder):
  """Upsampled sklearn digits with labels; see the module docstring."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [DigitsConfig(name=f'r{r}', resolution=r) for r in (16, 32)]

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    return self.dataset_info(
        {
            'image': tfds_util.tensor((r, r, 1), np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
            'index': tfds.features.Scalar(dtype=np.int32),
        },
        description=__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager  # The digits ship with scikit-learn.
    import sklearn.datasets  # imported here: sklearn takes seconds to import
    digits = sklearn.datasets.load_digits()
    if len(digits.target) != NUM_EXAMPLES:
      raise ValueError(f'expected {NUM_EXAMPLES} sklearn digits, '
                       f'got {len(digits.target)}')
    image_nxrxrx1 = upsample(digits.images, self.builder_config.resolution)
    return {split: self._generate_examples(index_n, image_nxrxrx1, digits.target)
            for split, index_n in split_indices().items()}

  def _generate_examples(self, index_n, image_nxrxrx1, label_n):
    for index in index_n:
      yield int(index), {
          'image': image_nxrxrx1[index],
          'label': int(label_n[index]),
          'index': int(index),
      }
