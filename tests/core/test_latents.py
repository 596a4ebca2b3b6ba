"""core.latents: a finished autoencoder run loaded once per checkpoint, and the smoke presets'
train_limit on the encoded training set."""
import shutil

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from core import data, latents, registry, train
from experiments.configs import flow_2d

_TASK = "test_latents_scale"


@registry.register(_TASK)
def _build(config, workdir=None):
  """A one-parameter "autoencoder" w, moved by SGD on (w - 3)^2."""
  class Data:
    def __next__(self):
      return {"x": np.zeros((8, 1), np.float32)}

    def get_state(self):
      return {}

    def set_state(self, state):
      pass

  return train.Task(init_params=lambda key: {"w": jnp.ones((3,))},
                    loss=lambda p, b, k, c: (jnp.sum((p["w"] - 3.0) ** 2), {}, c),
                    train_data=lambda i, n: Data())


def _config(num_steps):
  c = flow_2d.get_config("smoke")
  c.task = _TASK
  c.data.update({"name": "image_crops", "config": "s32"})     # what from_run encodes for the scale
  c.train.update({"num_steps": num_steps, "checkpoint_every": 2, "eval_every": 0, "sample_every": 0})
  c.optim.update({"name": "sgd", "lr": 0.1, "warmup_steps": 0, "schedule": "constant", "ema_decay": 0.0})
  return c


def test_from_run_loads_a_checkpoint_once_and_a_new_one_again(tmp_path):
  traced = []

  def encode(model, params, x):
    traced.append(1)          # once per encoder compiled, i.e. per checkpoint actually loaded
    return x * params["w"]

  def load(workdir, num_steps=2):
    return latents.FrozenAutoencoder.from_run(str(workdir), num_steps, _TASK, "config.x", lambda c: None,
                                              encode, lambda m, p, z: z, factor=lambda m: 1)

  crops = data.to_float({"image": data.load_in_memory("image_crops", "train", config="s32")
                         .arrays["image"][:512]}, None)["image"]
  run = tmp_path / "ae"
  train.train(_config(2), str(run))
  a, b = load(run), load(run)
  assert len(traced) == 1
  np.testing.assert_allclose(a.latent_scale, 1 / np.std(crops * np.asarray(a.params["w"])), rtol=1e-5)
  assert b.latent_scale == a.latent_scale and np.array_equal(b.params["w"], a.params["w"])
  assert b.params is not a.params and b.config is not a.config     # callers may change their own
  a.params["w"] = None
  assert load(run).params["w"] is not None
  assert len(traced) == 1
  with pytest.raises(FileNotFoundError, match="config.x"):         # short of num_steps, cached or not
    load(run, num_steps=4)
  # Trained further: the new checkpoint is loaded, with its own scale.
  train.train(_config(4), str(run))
  c = load(run, num_steps=4)
  assert len(traced) == 2 and not np.array_equal(c.params["w"], b.params["w"])
  np.testing.assert_allclose(c.latent_scale, 1 / np.std(crops * np.asarray(c.params["w"])), rtol=1e-5)
  # A copy elsewhere (or a run retrained in place) is another checkpoint: loaded afresh.
  shutil.copytree(run, tmp_path / "copy")
  assert load(tmp_path / "copy", num_steps=4).latent_scale == c.latent_scale and len(traced) == 3
  shutil.rmtree(run)
  train.train(_config(4), str(run))
  load(run, num_steps=4)
  assert len(traced) == 4


def test_train_limit_encodes_evenly_spaced_training_images_and_their_mirrors():
  images = data.to_float({"image": data.load_in_memory("image_crops", "train", config="s32")
                          .arrays["image"]}, None)["image"]
  encode = lambda x: x[:, ::8, ::8, :]        # a 4x4 "latent" that keeps the flip visible
  dc = ml_collections.ConfigDict({"name": "image_crops", "config": "s32"})
  full = latents.encoded_sources(dc, encode)("train").arrays["latent"]
  assert len(full) == 2 * len(images)
  dc.train_limit = 10
  sources = latents.encoded_sources(dc, encode)
  limited = sources("train").arrays["latent"]
  kept = images[::len(images) // 10][:10]
  assert len(np.unique(np.asarray(kept).reshape(10, -1), axis=0)) == 10
  np.testing.assert_array_equal(limited[:10], encode(kept))
  np.testing.assert_array_equal(limited[10:], encode(kept[:, :, ::-1]))
  assert len(sources("eval").arrays["latent"]) == len(data.load_in_memory(
      "image_crops", "eval", config="s32").arrays["image"])          # only the training set is cut
