"""`BatchIterator` and `InMemorySource`: determinism, host slicing, resuming, epochs."""
import json

import numpy as np
import pytest

import core.data
from core.data import pipeline


def _source(n: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
  """A plain list source: `id` is the example's index, `x` random data."""
  return [{'id': np.int64(i), 'x': rng.normal(size=(3, 2)).astype(np.float32)}
          for i in range(n)]


def _add_noise(example, rng):
  return {**example, 'x': example['x'] + rng.normal(size=example['x'].shape)}


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def _take(iterator, k):
  return [next(iterator) for _ in range(k)]


def test_batches_have_local_shape_and_same_seed_same_batches(rng):
  source = pipeline.InMemorySource(_source(103, rng))
  seed = int(rng.integers(2**31))
  make = lambda s: core.data.BatchIterator(
      source, global_batch_size=8, seed=s, transform=_add_noise)
  first, second, other = _take(make(seed), 30), _take(make(seed), 30), _take(
      make(seed + 1), 30)
  assert first[0]['x'].shape == (8, 3, 2) and first[0]['id'].shape == (8,)
  for a, b in zip(first, second):
    _assert_batches_equal(a, b)
  # Two seeds give the same first 8 of 103 ids with probability 96! / 103! < 1e-15.
  assert not np.array_equal(first[0]['id'], other[0]['id'])


def test_plain_list_and_in_memory_sources_agree(rng):
  items = _source(50, rng)
  kwargs = dict(global_batch_size=6, seed=int(rng.integers(2**31)), transform=_add_noise)
  for a, b in zip(
      _take(core.data.BatchIterator(items, **kwargs), 20),
      _take(core.data.BatchIterator(pipeline.InMemorySource(items), **kwargs), 20)):
    _assert_batches_equal(a, b)


@pytest.mark.parametrize('drop_remainder', [True, False])
def test_hosts_get_disjoint_slices_of_the_global_batch(drop_remainder, rng):
  source = pipeline.InMemorySource(_source(61, rng))
  kwargs = dict(global_batch_size=12, seed=int(rng.integers(2**31)), transform=_add_noise,
                drop_remainder=drop_remainder)
  single = _take(core.data.BatchIterator(source, **kwargs), 12)
  hosts = [_take(core.data.BatchIterator(source, process_index=p,
                                         process_count=2, **kwargs), 12)
           for p in range(2)]
  for step, global_batch in enumerate(single):
    local = [hosts[p][step] for p in range(2)]
    assert local[0]['id'].shape == (6,)
    if drop_remainder:
      assert not set(local[0]['id'].tolist()) & set(local[1]['id'].tolist())
    # Same examples and same augmentations whatever the process count.
    _assert_batches_equal(
        global_batch,
        {k: np.concatenate([local[0][k], local[1][k]]) for k in global_batch})


def test_set_state_resumes_exactly(rng):
  source = pipeline.InMemorySource(_source(37, rng))
  kwargs = dict(global_batch_size=5, seed=int(rng.integers(2**31)), transform=_add_noise)
  uninterrupted = _take(core.data.BatchIterator(source, **kwargs), 25)
  first = core.data.BatchIterator(source, **kwargs)
  _take(first, 13)
  state = json.loads(json.dumps(first.get_state()))
  resumed = core.data.BatchIterator(source, **kwargs)
  resumed.set_state(state)
  for a, b in zip(uninterrupted[13:], _take(resumed, 12)):
    _assert_batches_equal(a, b)
  for step in (0, 7, 24):
    _assert_batches_equal(uninterrupted[step], resumed.batch_at(step))


def test_set_state_rejects_another_pipeline(rng):
  source = _source(20, rng)
  state = core.data.BatchIterator(source, global_batch_size=4, seed=0).get_state()
  other = core.data.BatchIterator(source, global_batch_size=4, seed=1)
  with pytest.raises(ValueError, match='seed'):
    other.set_state(state)


def test_each_epoch_visits_every_example_once(rng):
  n, batch = 40, 8
  iterator = core.data.BatchIterator(_source(n, rng), global_batch_size=batch,
                                     seed=int(rng.integers(2**31)))
  assert iterator.steps_per_epoch == 5
  epochs = [np.concatenate([b['id'] for b in _take(iterator, 5)]) for _ in range(3)]
  for ids in epochs:
    np.testing.assert_array_equal(np.sort(ids), np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1])  # equal with probability 1 / 40!


def test_drop_remainder_false_pads_and_masks_the_last_batch(rng):
  n, batch, seed = 23, 6, int(rng.integers(2**31))
  iterator = core.data.BatchIterator(_source(n, rng), global_batch_size=batch, seed=seed,
                                     process_index=1, process_count=2,
                                     drop_remainder=False)
  assert iterator.steps_per_epoch == 4
  other = core.data.BatchIterator(_source(n, rng), global_batch_size=batch, seed=seed,
                                  process_index=0, process_count=2,
                                  drop_remainder=False)
  ids = []
  for it in (iterator, other):
    for b in _take(it, 4):
      assert b['mask'].shape == (3,) and b['id'].shape == (3,)
      ids.append(b['id'][b['mask']])
  np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(n))


def test_drop_remainder_true_skips_the_partial_batch(rng):
  iterator = core.data.BatchIterator(_source(23, rng), global_batch_size=6,
                                     seed=int(rng.integers(2**31)))
  assert iterator.steps_per_epoch == 3
  ids = np.concatenate([b['id'] for b in _take(iterator, 3)])
  assert len(set(ids.tolist())) == 18 and 'mask' not in next(iterator)


def test_no_shuffle_keeps_source_order(rng):
  iterator = core.data.BatchIterator(_source(12, rng), global_batch_size=4, seed=0,
                                     shuffle=False)
  np.testing.assert_array_equal(
      np.concatenate([b['id'] for b in _take(iterator, 6)]),
      np.tile(np.arange(12), 2))


def test_transform_rng_depends_on_position_not_step_order(rng):
  source = _source(16, rng)
  iterator = core.data.BatchIterator(source, global_batch_size=4,
                                     seed=int(rng.integers(2**31)), transform=_add_noise)
  later_first = iterator.batch_at(3)
  _take(iterator, 3)
  _assert_batches_equal(later_first, next(iterator))
  # Distinct examples get distinct noise.
  noise = later_first['x'] - np.stack([source[i]['x'] for i in later_first['id']])
  assert len(np.unique(noise[:, 0, 0])) == 4


@pytest.mark.parametrize('kwargs, message', [
    (dict(global_batch_size=6, process_count=4), 'divisible'),
    (dict(global_batch_size=8, process_index=2, process_count=2), 'process_index'),
    (dict(global_batch_size=64), 'exceeds'),
])
def test_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    # The arguments are rejected before the data or the seed are used.
    core.data.BatchIterator(_source(10, np.random.default_rng(0)), seed=0, **kwargs)


def test_tfds_source_and_in_memory_copy_give_the_same_batches(data_dir):
  source = core.data.load('digits', 'test', config='r16', data_dir=data_dir)
  in_memory = pipeline.InMemorySource(source)
  assert len(in_memory) == len(source)
  transform = core.data.compose(core.data.random_flip, core.data.to_float)
  kwargs = dict(global_batch_size=32, seed=1, transform=transform)
  for a, b in zip(_take(core.data.BatchIterator(source, **kwargs), 3),
                  _take(core.data.BatchIterator(in_memory, **kwargs), 3)):
    _assert_batches_equal(a, b)
    assert a['image'].dtype == np.float32 and a['label'].shape == (32,)
