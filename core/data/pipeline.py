"""A deterministic, resumable, multi-host batch iterator over a random-access source.

Everything is a function of (seed, step), never of history: the example order of
epoch e is a permutation seeded by (seed, e); global batch b of an epoch covers
positions [b * GB, (b + 1) * GB) of that order; process p takes the contiguous
slice [p * GB / P, (p + 1) * GB / P) of it. A per-example transform gets an rng
seeded by (seed, epoch, position), so augmentations do not depend on the
number of processes or on restarts. Resuming is therefore just setting the step.
"""
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

Example = dict[str, np.ndarray]
Transform = Callable[[Example, np.random.Generator], Example]

_READ_CHUNK = 4096
# Last seed word of each rng stream. SeedSequence zero-pads short entropy, so
# [seed, epoch] and [seed, epoch, 0] would collide without a distinct tag.
_PERMUTATION_STREAM = 1
_TRANSFORM_STREAM = 2


def _get_items(source, index_n: np.ndarray) -> list[Example]:
  """Examples at `index_n`, read in one call when the source supports it."""
  indices = [int(i) for i in index_n]
  if hasattr(source, '__getitems__'):
    return list(source.__getitems__(indices))
  return [source[i] for i in indices]


def _stack(examples: list[Example]) -> Example:
  return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}


class InMemorySource:
  """A random-access source held as stacked numpy arrays.

  Decoding tfds records costs ~0.1 ms each (a batch of 256 small images takes
  tens of ms); the datasets in `core/data` are small (<= ~40 MB), and reading
  them once into memory makes gathering a batch cost a few ms.
  """

  def __init__(self, source=None, *, arrays: Mapping[str, np.ndarray] | None = None):
    """Reads every example of `source` (len() and [i] giving dicts of arrays), or wraps `arrays`."""
    if arrays is None:
      n = len(source)
      chunks = [_stack(_get_items(source, np.arange(i, min(i + _READ_CHUNK, n))))
                for i in range(0, n, _READ_CHUNK)]
      arrays = {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}
    self.arrays = dict(arrays)

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def __getitem__(self, index: int) -> Example:
    return {key: value[index] for key, value in self.arrays.items()}

  def __getitems__(self, indices: list[int]) -> list[Example]:
    gathered = {key: value[indices] for key, value in self.arrays.items()}
    return [{key: value[i] for key, value in gathered.items()}
            for i in range(len(indices))]


class BatchIterator(Iterator[Example]):
  """Infinite iterator over this process's slices of global batches.

  Yields dicts of stacked arrays with leading dimension
  global_batch_size // process_count. With `drop_remainder=False` the last
  batch of each epoch is padded by wrapping to the start of that epoch's order,
  and every batch carries `mask` (bool [B], False on padding), so each epoch
  visits every example exactly once with fixed batch shapes on every process.
  """

  def __init__(self, source, *, global_batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1,
               transform: Transform | None = None, shuffle: bool = True,
               drop_remainder: bool = True):
    """See the class and module docstrings.

    Args:
      source: random-access source: len() and source[i] -> dict of arrays
        (and optionally `__getitems__(indices)` for batched reads).
      global_batch_size: examples per step summed over all processes.
      seed: seeds the epoch permutations and the per-example transform rngs.
      process_index: which slice of each global batch this process gets.
      process_count: number of processes sharing each global batch.
      transform: `transform(example, rng) -> example`, applied per example.
      shuffle: permute each epoch (else the source order every epoch).
      drop_remainder: drop the last partial global batch of each epoch (else
        pad it and add `mask`).
    """
    self.num_examples = len(source)
    if (process_count < 1 or global_batch_size < 1
        or global_batch_size % process_count):
      raise ValueError(
          f'global_batch_size ({global_batch_size}) must be positive and '
          f'divisible by process_count ({process_count} >= 1)')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index must be in [0, {process_count}), '
                       f'got {process_index}')
    if drop_remainder and global_batch_size > self.num_examples:
      raise ValueError(
          f'global_batch_size ({global_batch_size}) exceeds the dataset size '
          f'({self.num_examples}) with drop_remainder=True')
    self.source = source
    self.global_batch_size = global_batch_size
    self.seed = seed
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.transform = transform
    self.shuffle = shuffle
    self.drop_remainder = drop_remainder
    self.steps_per_epoch = (
        self.num_examples // global_batch_size if drop_remainder else
        -(-self.num_examples // global_batch_size))
    self.step = 0
    self._order_epoch, self._order_n = None, None

  def _order(self, epoch: int) -> np.ndarray:
    """Source indices of epoch `epoch` in visiting order; [num_examples]."""
    if epoch != self._order_epoch:
      if self.shuffle:
        rng = np.random.default_rng([self.seed, epoch, _PERMUTATION_STREAM])
        self._order_n = rng.permutation(self.num_examples)
      else:
        self._order_n = np.arange(self.num_examples)
      self._order_epoch = epoch
    return self._order_n

  def batch_at(self, step: int) -> Example:
    """This process's slice of global batch `step` (counted over all epochs)."""
    epoch, batch = divmod(step, self.steps_per_epoch)
    start = batch * self.global_batch_size + (
        self.process_index * self.local_batch_size)
    position_b = np.arange(start, start + self.local_batch_size)
    examples = _get_items(
        self.source, self._order(epoch)[position_b % self.num_examples])
    if self.transform is not None:
      examples = [
          self.transform(ex, np.random.default_rng(
              [self.seed, epoch, int(position), _TRANSFORM_STREAM]))
          for ex, position in zip(examples, position_b)]
    batch_dict = _stack(examples)
    if not self.drop_remainder:
      batch_dict['mask'] = position_b < self.num_examples
    return batch_dict

  def __next__(self) -> Example:
    batch_dict = self.batch_at(self.step)
    self.step += 1
    return batch_dict

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position; `set_state` of it resumes exactly here."""
    return {'step': self.step, 'seed': self.seed,
            'global_batch_size': self.global_batch_size,
            'num_examples': self.num_examples}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from `state` (from `get_state`) of an identical pipeline."""
    for key in ('seed', 'global_batch_size', 'num_examples'):
      if state[key] != getattr(self, key):
        raise ValueError(f'state has {key}={state[key]}, but this iterator '
                         f'has {getattr(self, key)}')
    self.step = int(state['step'])
