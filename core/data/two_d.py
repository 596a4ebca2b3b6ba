"""2-D toy distributions: numpy samplers and the `two_d` tfds builder.

The samplers are plain numpy so that code which needs fresh points (RL rewards,
distances between sample sets) draws from exactly the distribution the stored
dataset was drawn from.

Distributions (all roughly within [-2.5, 2.5]^2, so no rescaling is needed
before a flow model):
  * `double_ring`: two concentric circles of radii `RING_RADII` = (1, 2), each
    holding half the mass, angle uniform, radius jittered by N(0, RING_STD^2)
    with RING_STD = 0.05, so |x| is exactly a two-component normal mixture.
  * `gaussian_mixture`: 8 isotropic Gaussians, std GMM_STD = 0.1, centred on the
    circle of radius GMM_RADIUS = 2 at angles 2*pi*k/8, equal weights.
  * `checkerboard`: uniform on the 8 unit squares of the 4x4 board covering
    [-2, 2]^2 whose integer corner (i, j) (i, j in -2..1) has i + j even.
"""
import numpy as np
import tensorflow_datasets as tfds

from core.data import tfds_util

RING_RADII = (1.0, 2.0)
RING_STD = 0.05
GMM_RADIUS = 2.0
GMM_STD = 0.1
GMM_NUM_MODES = 8

NUM_TRAIN = 65536
NUM_EVAL = 8192
# Seeds per split: train and eval are independent draws of the same law.
_SPLIT_SEEDS = {'train': 0, 'eval': 1}


def _double_ring(n: int, rng: np.random.Generator) -> np.ndarray:
  radius_n = np.asarray(RING_RADII)[rng.integers(0, len(RING_RADII), n)]
  radius_n = radius_n + RING_STD * rng.standard_normal(n)
  angle_n = rng.uniform(0.0, 2 * np.pi, n)
  return radius_n[:, None] * np.stack([np.cos(angle_n), np.sin(angle_n)], 1)


def gmm_centres() -> np.ndarray:
  """Centres of the `gaussian_mixture` modes, [GMM_NUM_MODES, 2] float64."""
  angle_k = 2 * np.pi * np.arange(GMM_NUM_MODES) / GMM_NUM_MODES
  return GMM_RADIUS * np.stack([np.cos(angle_k), np.sin(angle_k)], 1)


def _gaussian_mixture(n: int, rng: np.random.Generator) -> np.ndarray:
  centre_nx2 = gmm_centres()[rng.integers(0, GMM_NUM_MODES, n)]
  return centre_nx2 + GMM_STD * rng.standard_normal((n, 2))


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
  # Pick a column i in -2..1, then a row j of the same parity so i + j is even.
  col_n = rng.integers(-2, 2, n)
  row_n = 2 * rng.integers(-1, 1, n) + (col_n % 2)
  corner_nx2 = np.stack([col_n, row_n], 1)
  return corner_nx2 + rng.uniform(0.0, 1.0, (n, 2))


_SAMPLERS = {
    'double_ring': _double_ring,
    'gaussian_mixture': _gaussian_mixture,
    'checkerboard': _checkerboard,
}
NAMES = tuple(_SAMPLERS)


def sample_two_d(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
  """Draws `n` points of the 2-D distribution `name`; returns [n, 2] float32."""
  if name not in _SAMPLERS:
    raise ValueError(f'name must be one of {NAMES}, got {name!r}')
  return _SAMPLERS[name](n, rng).astype(np.float32)


class TwoD(tfds_util.Builder):
  """Points of a 2-D toy distribution; one BuilderConfig per distribution.

  Splits: `train` (NUM_TRAIN points) and `eval` (NUM_EVAL points), drawn with
  fixed, different seeds. Feature: `point` float32 [2].
  """

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in NAMES]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info(
        {'point': tfds_util.tensor((2,), np.float32)},
        description=__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    sizes = {'train': NUM_TRAIN, 'eval': NUM_EVAL}
    return {split: self._generate_examples(split, n)
            for split, n in sizes.items()}

  def _generate_examples(self, split: str, n: int):
    name_id = NAMES.index(self.builder_config.name)
    rng = np.random.default_rng([_SPLIT_SEEDS[split], name_id])
    point_nx2 = sample_two_d(self.builder_config.name, n, rng)
    for i, point in enumerate(point_nx2):
      yield i, {'point': point}
