"""SANA-SR's generative prior: the LinearDiT (`sr/lineardit.py`'s SANA blocks, as config.model
describes them) trained by rectified flow on the DC-AE's latents, task "sr_prior".

The DC-AE run is config.prior.dcae_workdir (relative to this run's workdir; trained with config.dcae
when missing); training latents are its scaled encodings of the crops and their mirror images
(`core.latents`). The flow task is `core.flow_task`'s, so the softmax twin is the same config with
config.model.attention = "xla".
"""
from __future__ import annotations

import os

import jax
import ml_collections

from core import flow_task, latents, registry, train
from sr import autoencoding


def dcae_path(config: ml_collections.ConfigDict, workdir: str | None) -> str:
  return os.path.normpath(os.path.join(workdir or os.curdir, os.path.expanduser(config.prior.dcae_workdir)))


def check_config(config: ml_collections.ConfigDict) -> None:
  latents.check_latent_data(config.data)
  flow_task.check_config(config)
  autoencoding.check_config(config.dcae)


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
  train.ensure_trained(config.dcae, dcae_path(config, workdir), "DC-AE")


@registry.register("sr_prior", check=check_config, prepare=prepare)
def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> train.Task:
  ae = autoencoding.Frozen(dcae_path(config, workdir), int(config.dcae.train.num_steps),
                           f"config.prior.dcae_workdir={config.prior.dcae_workdir!r}")
  return flow_task.make_task(config, latents.encoded_sources(config.data, ae.encode),
                             to_image=jax.jit(ae.decode))
