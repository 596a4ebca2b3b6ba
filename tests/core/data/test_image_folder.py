"""The `image_folder` builder on a temporary folder of generated images: crops equal the image regions,
the split follows the file-name rule, unreadable and too-small files are skipped with their names."""
import logging
import os
import zlib

import numpy as np
import pytest
from PIL import Image

import core.data
from core.data import image_folder, pipeline

SIZE, CROPS = 16, 3


def _eval_name(prefix, want_eval):
  """A file name whose crc32 rule puts it in eval (or train), found by trying suffixes."""
  for i in range(1000):
    name = f'{prefix}{i}.png'
    if (zlib.crc32(name.encode()) % 10 == 0) == want_eval:
      return name
  raise AssertionError('no name found')


def test_builds_crops_splits_and_skips_bad_files(tmp_path, rng, caplog):
  folder = tmp_path / 'my photos'
  folder.mkdir()
  images = {}
  for prefix, want_eval in (('a', False), ('b', False), ('c', True)):
    name = _eval_name(prefix, want_eval)
    h, w = (int(v) for v in rng.integers(SIZE, 3 * SIZE, size=2))
    images[name] = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(images[name]).save(folder / name)
  (folder / 'broken.jpg').write_bytes(b'not a jpeg at all')
  Image.fromarray(np.zeros((SIZE - 1, 40, 3), np.uint8)).save(folder / 'tiny.png')
  (folder / 'notes.txt').write_text('ignored')
  data_dir = str(tmp_path / 'tfds')
  spec = f's{SIZE}x{CROPS}:{folder}'
  with caplog.at_level(logging.WARNING):
    train = pipeline.InMemorySource(core.data.load('image_folder', 'train', config=spec,
                                                   data_dir=data_dir)).arrays
  assert 'broken.jpg' in caplog.text and 'tiny.png' in caplog.text
  evals = core.data.load_in_memory('image_folder', 'eval', config=spec, data_dir=data_dir).arrays
  files = {split: {f.decode() if isinstance(f, bytes) else str(f) for f in arrays['file_name']}
           for split, arrays in (('train', train), ('eval', evals))}
  want = {s: {n for n in images if image_folder.split_of(n) == s} for s in ('train', 'eval')}
  assert files == want
  assert train['image'].shape == (CROPS * len(want['train']), SIZE, SIZE, 3)
  n_eval = sum((images[n].shape[0] // SIZE) * (images[n].shape[1] // SIZE) for n in want['eval'])
  assert evals['image'].shape == (n_eval, SIZE, SIZE, 3)
  for arrays in (train, evals):
    for image, (row, col), f in zip(arrays['image'], arrays['offset'], arrays['file_name']):
      f = f.decode() if isinstance(f, bytes) else str(f)
      np.testing.assert_array_equal(image, images[f][row:row + SIZE, col:col + SIZE])
  # Built once: a second load reads the same records.
  again = pipeline.InMemorySource(core.data.load('image_folder', 'train', config=spec,
                                                 data_dir=data_dir)).arrays
  np.testing.assert_array_equal(again['image'], train['image'])


def test_a_folder_without_eval_names_gives_its_last_image_to_eval(tmp_path):
  names = [_eval_name(p, False) for p in 'xy']
  for n in names:
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(tmp_path / n)
  assert image_folder.image_files(str(tmp_path)) == {'train': sorted(names)[:1],
                                                    'eval': sorted(names)[1:]}


def test_bad_config_strings_are_named(tmp_path):
  with pytest.raises(ValueError, match="'s<size>\\[x<crops per image>\\]:<folder>'"):
    core.data.load('image_folder', 'train', config='256:/data', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='is not a folder'):
    image_folder.config_from_name(f's32:{tmp_path / "missing"}')
  with pytest.raises(ValueError, match='no images'):
    image_folder.image_files(str(tmp_path))
  cfg = image_folder.config_from_name(f's32x4:{tmp_path}')
  assert (cfg.crop_size, cfg.crops_per_image, cfg.folder) == (32, 4, os.path.abspath(tmp_path))
