"""`image_crops`: square RGB crops of scikit-image's bundled colour photographs.

Whole photographs are split between train and eval, so no eval crop shares a
pixel with a training crop:
  * train: astronaut, chelsea, rocket (natural photos), hubble_deep_field,
    retina (scientific images) and colorwheel (synthetic).
  * eval: coffee (a natural photo) and immunohistochemistry (a microscopy
    texture): one held-out image of each of the two kinds that dominate train.
The photo list is fixed; `source` indexes it, so its names are stable.

One BuilderConfig per crop size S, named `s{S}`. Splits:
  * `train`: `crops_per_image` uniformly random SxS crops of each train photo,
    from a fixed seed (counts per config in `CROPS_PER_IMAGE`: at most 1024 per
    photo, fewer for large S to keep each config near 40 MB).
  * `eval`: every non-overlapping SxS crop of the eval photos on the grid
    anchored at the top-left corner (the right/bottom remainder is dropped).
  * `eval_random`: `crops_per_image` random crops of each eval photo, for
    metrics that need more samples than the grid has at large S.
Features: `image` uint8 [S, S, 3], `source` ClassLabel over `PHOTOS`,
`offset` int32 [2] = (row, col) of the crop's top-left pixel in its photo.
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from core.data import tfds_util

TRAIN_PHOTOS = ('astronaut', 'chelsea', 'rocket', 'hubble_deep_field',
                'retina', 'colorwheel')
EVAL_PHOTOS = ('coffee', 'immunohistochemistry')
PHOTOS = TRAIN_PHOTOS + EVAL_PHOTOS
# Crop size -> random crops per photo (train and eval_random).
CROPS_PER_IMAGE = {16: 1024, 32: 1024, 64: 512, 128: 128, 256: 32}
_SPLIT_SEEDS = {'train': 0, 'eval_random': 1}


def load_photo(name: str) -> np.ndarray:
  """The skimage photo `name` as uint8 RGB [H, W, 3] (alpha dropped, gray tiled)."""
  import skimage.data  # imported here: skimage takes a second to import
  image = np.asarray(getattr(skimage.data, name)())
  if image.dtype != np.uint8:
    raise ValueError(f'{name}: expected a uint8 photo, got {image.dtype}')
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 4:
    image = image[..., :3]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image


def grid_offsets(height: int, width: int, size: int) -> np.ndarray:
  """(row, col) of every non-overlapping size x size crop; [N, 2] int32."""
  row_g, col_g = np.meshgrid(np.arange(0, height - size + 1, size),
                             np.arange(0, width - size + 1, size),
                             indexing='ij')
  return np.stack([row_g.ravel(), col_g.ravel()], 1).astype(np.int32)


def random_offsets(height: int, width: int, size: int, n: int,
                   rng: np.random.Generator) -> np.ndarray:
  """(row, col) of `n` uniformly random size x size crops; [n, 2] int32."""
  row_n = rng.integers(0, height - size + 1, n)
  col_n = rng.integers(0, width - size + 1, n)
  return np.stack([row_n, col_n], 1).astype(np.int32)


@dataclasses.dataclass(eq=False)
class CropConfig(tfds.core.BuilderConfig):
  crop_size: int = 32
  crops_per_image: int = 1024


class ImageCrops(tfds_util.Builder):
  """Square crops of skimage photographs; see the module docstring."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [
      CropConfig(name=f's{size}', crop_size=size, crops_per_image=count)
      for size, count in CROPS_PER_IMAGE.items()
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.crop_size
    return self.dataset_info(
        {
            'image': tfds_util.tensor((size, size, 3), np.uint8),
            'source': tfds.features.ClassLabel(names=PHOTOS),
            'offset': tfds_util.tensor((2,), np.int32),
        },
        description=__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager  # The photos ship with scikit-image.
    return {
        'train': self._generate_examples(TRAIN_PHOTOS, 'train'),
        'eval': self._generate_examples(EVAL_PHOTOS, 'eval'),
        'eval_random': self._generate_examples(EVAL_PHOTOS, 'eval_random'),
    }

  def _generate_examples(self, photos: tuple[str, ...], split: str):
    size = self.builder_config.crop_size
    for name in photos:
      photo = load_photo(name)
      height, width, _ = photo.shape
      if min(height, width) < size:
        raise ValueError(f'{name} ({height}x{width}) is smaller than {size}')
      if split == 'eval':
        offset_nx2 = grid_offsets(height, width, size)
      else:
        # Seeded per (split, photo, size): configs and photos draw independently.
        rng = np.random.default_rng([_SPLIT_SEEDS[split], PHOTOS.index(name),
                                     size])
        offset_nx2 = random_offsets(height, width, size,
                                    self.builder_config.crops_per_image, rng)
      for i, (row, col) in enumerate(offset_nx2):
        yield f'{name}/{i}', {
            'image': photo[row:row + size, col:col + size],
            'source': name,
            'offset': np.array([row, col], np.int32),
        }
