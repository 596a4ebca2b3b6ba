"""The `image_crops` builder: split sizes, crop contents and train/eval separation."""
import numpy as np
import pytest
import skimage.data

import core.data
from core.data import image_crops
from core.data import pipeline

SIZE = 16


@pytest.fixture(scope='module')
def splits(data_dir):
  """split name -> in-memory arrays of image_crops/s16."""
  return {split: pipeline.InMemorySource(core.data.load(
      'image_crops', split, config=f's{SIZE}', data_dir=data_dir)).arrays
          for split in ('train', 'eval', 'eval_random')}


def test_split_sizes_shapes_and_dtypes(splits):
  photo_shapes = [image_crops.load_photo(n).shape for n in image_crops.EVAL_PHOTOS]
  expected = {
      'train': len(image_crops.TRAIN_PHOTOS) * image_crops.CROPS_PER_IMAGE[SIZE],
      'eval': sum((h // SIZE) * (w // SIZE) for h, w, _ in photo_shapes),
      'eval_random': 2 * image_crops.CROPS_PER_IMAGE[SIZE],
  }
  for split, arrays in splits.items():
    n = expected[split]
    assert arrays['image'].shape == (n, SIZE, SIZE, 3)
    assert arrays['image'].dtype == np.uint8
    assert arrays['offset'].shape == (n, 2)
    assert arrays['source'].shape == (n,)
  # Crops of real photos use (nearly) the whole byte range.
  assert splits['train']['image'].min() == 0
  assert splits['train']['image'].max() == 255


def test_sources_respect_the_photo_split(splits):
  train_ids = {image_crops.PHOTOS.index(n) for n in image_crops.TRAIN_PHOTOS}
  eval_ids = {image_crops.PHOTOS.index(n) for n in image_crops.EVAL_PHOTOS}
  assert set(splits['train']['source'].tolist()) == train_ids
  assert set(splits['eval']['source'].tolist()) == eval_ids
  assert set(splits['eval_random']['source'].tolist()) == eval_ids
  assert not train_ids & eval_ids


def test_crops_are_their_photo_at_their_offset(splits, rng):
  photos = [image_crops.load_photo(n) for n in image_crops.PHOTOS]
  for arrays in splits.values():
    for i in rng.choice(len(arrays['image']), 200, replace=False):
      row, col = arrays['offset'][i]
      photo = photos[arrays['source'][i]]
      np.testing.assert_array_equal(
          arrays['image'][i], photo[row:row + SIZE, col:col + SIZE])


def test_eval_grid_covers_each_cell_once(splits):
  arrays = splits['eval']
  assert np.all(arrays['offset'] % SIZE == 0)
  keys = set(zip(arrays['source'].tolist(), map(tuple, arrays['offset'].tolist())))
  assert len(keys) == len(arrays['source'])


def test_no_eval_crop_equals_a_train_crop(splits):
  train = {crop.tobytes() for crop in splits['train']['image']}
  for split in ('eval', 'eval_random'):
    assert not any(crop.tobytes() in train for crop in splits[split]['image'])


def test_train_crops_are_spread_over_each_photo(splits):
  arrays = splits['train']
  for name in image_crops.TRAIN_PHOTOS:
    h, w, _ = image_crops.load_photo(name).shape
    offset_nx2 = arrays['offset'][arrays['source'] == image_crops.PHOTOS.index(name)]
    assert len(offset_nx2) == image_crops.CROPS_PER_IMAGE[SIZE]
    assert offset_nx2.min() >= 0
    assert np.all(offset_nx2.max(0) <= [h - SIZE, w - SIZE])
    # Uniform offsets: the mean is near the middle of the valid range.
    np.testing.assert_allclose(offset_nx2.mean(0), [(h - SIZE) / 2, (w - SIZE) / 2],
                               rtol=0.1)


@pytest.mark.parametrize('channels', [None, 1, 4])
def test_load_photo_makes_rgb(monkeypatch, channels, rng):
  shape = (5, 7) if channels is None else (5, 7, channels)
  fake = rng.integers(0, 256, shape, dtype=np.uint8)
  monkeypatch.setattr(skimage.data, 'fake_photo', lambda: fake, raising=False)
  rgb = image_crops.load_photo('fake_photo')
  assert rgb.shape == (5, 7, 3)
  if channels == 4:
    np.testing.assert_array_equal(rgb, fake[..., :3])
  else:
    for c in range(3):
      np.testing.assert_array_equal(rgb[..., c], fake.reshape(5, 7))


def test_grid_offsets_tile_without_overlap(rng):
  h, w, size = rng.integers(40, 90), rng.integers(40, 90), rng.integers(3, 20)
  offset_nx2 = image_crops.grid_offsets(h, w, size)
  covered = np.zeros((h, w), int)
  for row, col in offset_nx2:
    covered[row:row + size, col:col + size] += 1
  assert covered.max() == 1
  assert covered[:h // size * size, :w // size * size].min() == 1
