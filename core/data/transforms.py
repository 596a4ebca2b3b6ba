"""Per-example transforms for `BatchIterator`: `fn(example, rng) -> example`.

They act on the `image` feature ([H, W, C]) and leave other features alone.
"""
import numpy as np

from core.data.pipeline import Example, Transform


def random_flip(example: Example, rng: np.random.Generator) -> Example:
  """Mirrors `image` [H, W, C] left-right with probability 1/2."""
  if rng.random() < 0.5:
    return {**example, 'image': example['image'][:, ::-1]}
  return example


def to_float(example: Example, rng: np.random.Generator) -> Example:
  """uint8 `image` in 0..255 -> float32 in [-1, 1], elementwise.

  Being elementwise, it also converts a stacked batch (`to_float(batch, None)`),
  which is cheaper than converting per example.
  """
  del rng  # Deterministic.
  image = example['image']
  if image.dtype != np.uint8:
    raise ValueError(f'to_float expects a uint8 image, got {image.dtype}')
  return {**example, 'image': image.astype(np.float32) / 127.5 - 1.0}


def compose(*transforms: Transform) -> Transform:
  """Applies `transforms` in order, all drawing from the one example rng."""
  def composed(example: Example, rng: np.random.Generator) -> Example:
    for transform in transforms:
      example = transform(example, rng)
    return example
  return composed
