"""A trained autoencoder, frozen, as the latent models built on it use it (PiD's KL autoencoder,
SANA-SR's DC-AE); and the dataset of its latents that a latent flow model trains on.

Latents are scaled to unit variance over the autoencoder's training crops (latent diffusion's
scale_factor, arXiv 2112.10752 Sec. 4.3.2): `latent_scale` = 1 / the std of the encodings of the
first 512 training crops, computed from the checkpoint, so every run that loads it agrees.
"""
from __future__ import annotations

import collections
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from core import data, train


class FrozenAutoencoder:
  """`encode`: images [B, H, W, 3] in [-1, 1] -> scaled latents [B, H/f, W/f, c]; `decode`: back.

  Attributes: model, params, config (the autoencoder run's), factor f, latent_scale.
  """

  def __init__(self, model, params, config, factor: int, latent_scale: float, encode_fn: Callable,
               decode_fn: Callable):
    """encode_fn / decode_fn: (model, params, x) -> unscaled latent / image. `from_run` loads a run."""
    self.model, self.params, self.config = model, params, config
    self.factor, self.latent_scale = int(factor), float(latent_scale)
    self._encode_fn, self._decode_fn = encode_fn, decode_fn

  @classmethod
  def from_run(cls, workdir: str, num_steps: int, task: str, field: str,
               build_model: Callable[[ml_collections.ConfigDict], object], encode_fn: Callable,
               decode_fn: Callable, factor: Callable[[object], int]) -> "FrozenAutoencoder":
    """workdir: the run; num_steps: the steps it must have finished; task: its task name; field: the
    config field that names it (for the error when it has not); build_model: its network from its
    config; factor: model -> pixels per latent cell. latent_scale is computed from the checkpoint."""
    key = _checkpoint_key(workdir, task, encode_fn)
    loaded = None if key is None else _LOADED.get(key)
    if loaded is None:
      params, config = train.restore_trained(workdir, num_steps, task, field)
      model = build_model(config)
      crops = data.to_float({"image": data.load_in_memory(
          config.data.name, "train", config=config.data.config).arrays["image"][:512]}, None)
      latents = jax.jit(lambda p, x: encode_fn(model, p, x))(params, crops["image"])
      loaded = (params, config, 1.0 / np.asarray(latents).std())
      if key is not None:
        _LOADED[key] = loaded
        while len(_LOADED) > _LOADED_MAX:
          _LOADED.popitem(last=False)
    else:
      if key[1] < num_steps:      # short of num_steps: restore_trained raises, naming `field`
        train.restore_trained(workdir, num_steps, task, field)
      _LOADED.move_to_end(key)
    params, config, latent_scale = loaded
    # Fresh containers and config for each caller; the arrays are immutable and shared.
    params, config = jax.tree.map(lambda x: x, params), config.copy_and_resolve_references()
    model = build_model(config)
    return cls(model, params, config, factor(model), latent_scale, encode_fn, decode_fn)

  def with_params(self, params) -> "FrozenAutoencoder":
    """The same autoencoder with other parameters (e.g. traced ones, to count a pipeline's MACs)."""
    return FrozenAutoencoder(self.model, params, self.config, self.factor, self.latent_scale,
                             self._encode_fn, self._decode_fn)

  def encode(self, x_BxHxWx3: jax.Array, params=None) -> jax.Array:
    """Scaled latents; `params` replaces the frozen ones (e.g. with LoRA merged in)."""
    p = self.params if params is None else params
    return self._encode_fn(self.model, p, x_BxHxWx3) * self.latent_scale

  def decode(self, z: jax.Array, params=None) -> jax.Array:
    return self._decode_fn(self.model, self.params if params is None else params, z / self.latent_scale)


# Runs `from_run` loaded in this process: restoring one and computing its latent_scale (compiling the
# encoder, encoding 512 crops) took ~4 s at the smoke sizes, and a table loads the same autoencoder
# for every model built on it. Keyed by the checkpoint it was restored from, so a run trained
# further, retrained or copied elsewhere is loaded afresh; the least recently used are dropped.
_LOADED: collections.OrderedDict = collections.OrderedDict()
_LOADED_MAX = 4


def _checkpoint_key(workdir: str, task: str, encode_fn: Callable) -> tuple | None:
  """(path, latest step, that checkpoint's inode and mtime, task, encode_fn); None without one."""
  step = train.trained_steps(workdir)
  if not step:
    return None
  path = os.path.realpath(os.path.normpath(workdir))   # as trained_steps: "run/../base"
  st = os.stat(os.path.join(path, "checkpoints", str(step)))
  return path, step, st.st_ino, st.st_mtime_ns, task, encode_fn


def encoded_sources(data_config: ml_collections.ConfigDict, encode: Callable) -> Callable:
  """split -> data.InMemorySource {"latent": float32 [N, h, w, c]} of the dataset's images encoded by
  `encode` (jitted here; chunks of 512); the train split holds each image and its mirror image (a
  flip of the image, not of the latent). data_config.train_limit, where set (smoke presets, whose
  few steps need few examples; encoding all 6144 crops took 10-18 s there), keeps that many training
  images, evenly spaced through the split, before the mirrors are added."""
  encode = jax.jit(encode)
  cache = {}
  limit = data_config.get("train_limit")

  def sources(split):
    if split not in cache:
      images = data.to_float({"image": data.load_in_memory(
          data_config.name, split, config=data_config.config).arrays["image"]}, None)["image"]
      if split == "train":
        if limit:
          images = images[::max(1, len(images) // int(limit))][:int(limit)]
        images = np.concatenate([images, images[:, :, ::-1]])
      latents = np.concatenate([np.asarray(encode(images[i:i + 512]))
                                for i in range(0, len(images), 512)])
      cache[split] = data.InMemorySource(arrays={"latent": latents.astype(np.float32)})
    return cache[split]

  return sources


def check_latent_data(data_config: ml_collections.ConfigDict) -> None:
  """A latent flow model's data fields: it trains on the field 'latent' of `encoded_sources`, without
  random flips (the training set already holds the mirror images)."""
  if data_config.field != "latent" or data_config.get("random_flip", False):
    raise ValueError(f"config.data.field={data_config.field!r}, random_flip="
                     f"{data_config.get('random_flip', False)}: a latent flow model trains on the field "
                     "'latent' without random flips (its training set holds the mirrors)")
