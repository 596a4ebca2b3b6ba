"""Datasets (tfds builders, array_record, no TensorFlow) and the input pipeline.

  source = core.data.load('image_crops', 'train', config='s32')
  it = core.data.BatchIterator(
      source, global_batch_size=256, seed=0,
      process_index=jax.process_index(), process_count=jax.process_count(),
      transform=core.data.compose(core.data.random_flip, core.data.to_float))
  batch = next(it)  # {'image': float32 [256 / P, 32, 32, 3], ...}
"""
from core.data.pipeline import BatchIterator
from core.data.pipeline import InMemorySource
from core.data.registry import check_config
from core.data.registry import config_names
from core.data.registry import crop_size
from core.data.registry import default_data_dir
from core.data.registry import load
from core.data.registry import load_in_memory
from core.data.transforms import compose
from core.data.transforms import random_flip
from core.data.transforms import to_float
from core.data.two_d import sample_two_d


def flipped_images(config, data_config, process_index: int, process_count: int) -> BatchIterator:
  """This process's batches {"image": float32 [B, H, W, C] in [-1, 1]} of data_config's train split,
  each image mirrored with probability 1/2 (the image tasks' train_data: decoders/)."""
  return BatchIterator(
      load_in_memory(data_config.name, "train", config=data_config.config),
      global_batch_size=int(config.train.global_batch_size), seed=config.seed,
      process_index=process_index, process_count=process_count,
      transform=lambda ex, rng: {"image": to_float(random_flip(ex, rng), rng)["image"]})
