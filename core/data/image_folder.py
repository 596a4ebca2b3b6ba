"""`image_folder`: square RGB crops of the images in a folder of the user's (DIV2K, LSDIR, own photos).

The folder is converted to array_record once, on first use, like every dataset of `core/data`:

  core.data.load('image_folder', 'train', config='s256:/data/DIV2K_train_HR')
  # in an experiment config: c.data.update({"name": "image_folder", "config": "s256:/data/DIV2K"})

Config strings are `s<S>[x<N>]:<folder>`: crop size S, N random train crops per image (default 16).
Splits are fixed by file name, so adding images never moves old ones between splits: an image is in
`eval` when crc32 of its name is 0 mod 10 (if that picks none, the last name in sorted order is).
  * `train`: N uniformly random S x S crops per train image, seeded by the image's name.
  * `eval`: every non-overlapping S x S crop on the grid anchored at the top-left corner.
Files that Pillow cannot read, and images smaller than S, are skipped with a warning naming them.
Features as `image_crops`: `image` uint8 [S, S, 3], `offset` int32 [2], plus `file_name`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import zlib

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from core.data import image_crops
from core.data import tfds_util

EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')
_SPEC = re.compile(r'^s(\d+)(?:x(\d+))?:(.+)$')


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  folder: str = ''
  crop_size: int = 256
  crops_per_image: int = 16


def config_from_name(spec: str) -> FolderConfig:
  """The config of a `s<S>[x<N>]:<folder>` string; ValueError naming what is wrong."""
  match = _SPEC.match(spec or '')
  if not match:
    raise ValueError(f"image_folder config must be 's<size>[x<crops per image>]:<folder>', e.g. "
                     f"'s256:/data/DIV2K_train_HR'; got {spec!r}")
  size, count, folder = int(match[1]), int(match[2] or 16), os.path.abspath(os.path.expanduser(match[3]))
  if not os.path.isdir(folder):
    raise ValueError(f'image_folder: {folder!r} is not a folder')
  if size < 1 or count < 1:
    raise ValueError(f'image_folder: crop size and crops per image must be positive, got {spec!r}')
  # The name keys the converted copy: the folder's base name and a hash of its full path.
  digest = hashlib.sha1(folder.encode()).hexdigest()[:8]
  base = re.sub(r'[^A-Za-z0-9_]', '_', os.path.basename(folder.rstrip('/')))[:40] or 'root'
  return FolderConfig(name=f'{base}_{digest}_s{size}x{count}', folder=folder, crop_size=size,
                      crops_per_image=count, description=f'{size} px crops of {folder}')


def split_of(file_name: str) -> str:
  return 'eval' if zlib.crc32(file_name.encode()) % 10 == 0 else 'train'


def image_files(folder: str) -> dict[str, list[str]]:
  """{'train': [...], 'eval': [...]}: the folder's image file names (not recursive), sorted."""
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(EXTENSIONS))
  if not names:
    raise ValueError(f'image_folder: no images ({", ".join(EXTENSIONS)}) in {folder!r}')
  splits = {'train': [n for n in names if split_of(n) == 'train'],
            'eval': [n for n in names if split_of(n) == 'eval']}
  if not splits['eval']:
    splits = {'train': names[:-1], 'eval': names[-1:]}
  return splits


def read_rgb(path: str) -> np.ndarray | None:
  """uint8 [H, W, 3], or None (with a warning naming the file) when Pillow cannot read it."""
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'))
  except (OSError, UnidentifiedImageError, ValueError) as e:
    logging.warning('image_folder: skipping %s: cannot read it (%s)', path, e)
    return None


class ImageFolder(tfds_util.Builder):
  """Crops of a user's image folder; see the module docstring. Configs come from `config_from_name`."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = []
  config_from_name = staticmethod(config_from_name)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.crop_size
    return self.dataset_info(
        {
            'image': tfds_util.tensor((size, size, 3), np.uint8),
            'offset': tfds_util.tensor((2,), np.int32),
            'file_name': tfds.features.Text(),
        },
        description=__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager
    files = image_files(self.builder_config.folder)
    return {split: self._generate_examples(names, split) for split, names in files.items()}

  def _generate_examples(self, names: list[str], split: str):
    cfg = self.builder_config
    size = cfg.crop_size
    for name in names:
      photo = read_rgb(os.path.join(cfg.folder, name))
      if photo is None:
        continue
      height, width, _ = photo.shape
      if min(height, width) < size:
        logging.warning('image_folder: skipping %s: %dx%d is smaller than the crop size %d', name,
                        height, width, size)
        continue
      if split == 'eval':
        offset_nx2 = image_crops.grid_offsets(height, width, size)
      else:
        rng = np.random.default_rng([zlib.crc32(name.encode()), size])
        offset_nx2 = image_crops.random_offsets(height, width, size, cfg.crops_per_image, rng)
      for i, (row, col) in enumerate(offset_nx2):
        yield f'{name}/{i}', {'image': photo[row:row + size, col:col + size],
                              'offset': np.array([row, col], np.int32), 'file_name': name}
