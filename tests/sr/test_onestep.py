"""sr/onestep.py: the one-step map is the prior's x0 prediction at t* and LoRA starts as the prior; the
multi-step baseline starts as the prior; the encoder-free projection; a sharded step with the linear-
attention kernel in interpret mode equals the single-device step; losses; bad inputs."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from core import sharding
from core.nn import lora
from core.nn.dit import DiT
from sr import autoencoding, dcae, onestep
from tests.core.nn.random_params import random_params

LAT, T_STAR, SCALE = 8, 0.999, 4
SPEC = dcae.Spec((4, 8, 32), (1, 1, 1), (1, 1, 1), ("res", "res", "evit"), latent_channels=LAT)


def _parts(rng, kernel_impl="xla"):
  ae_model = dcae.DCAE(SPEC, kernel_impl=kernel_impl)
  ae_params = random_params(ae_model, rng, jnp.zeros((1, 8, 8, 3)), scale=0.2)
  dit = DiT(patch_size=1, width=32, depth=2, num_heads=1, mlp_ratio=2.5, pos_embed="none",
            modulation="adaln_single", mlp="mixffn", attn_impl="linear")
  base = random_params(dit, rng, jnp.zeros((1, 2, 2, LAT)), jnp.zeros((1,)), scale=0.2)
  return autoencoding.untrained(ae_model, ae_params, latent_scale=1.7), dit, base


def _onestep(rng, kernel_impl="xla", key=None):
  ae, dit, base = _parts(rng, kernel_impl)
  model = onestep.SR("onestep", ae, dit, base, T_STAR, SCALE, lora_scale=1.0)
  key = jax.random.PRNGKey(0) if key is None else key
  params = {"dit_lora": lora.init_lora(base, [r"attn/(qkv|out)/kernel", r"mlp/fc[12]/kernel"], 2, key),
            "enc_lora": lora.init_lora(ae.params["encoder"], [r"conv|qkv|proj|down|project"], 2, key,
                                       convs=True)}
  return model, params


def _lr(rng, b=2, hw=(8, 12)):
  return jnp.asarray(rng.uniform(-1, 1, size=(b, *hw, 3)), jnp.float32)


def _random_b(rng, tree):
  return jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.asarray(0.1 * rng.normal(size=a.shape), a.dtype) if path[-1].key == "lora_b" else a,
      tree)


def test_one_step_is_the_x0_prediction_and_lora_starts_as_the_prior(rng):
  model, params = _onestep(rng)
  lr = _lr(rng)
  t = jnp.full((2,), T_STAR)
  # Each piece compiled once (op by op, the DC-AE's many small ops made this test slow).
  encode = jax.jit(lambda p, x: model.encode(p, x))
  forward = jax.jit(lambda p, x: model(p, x))
  x0 = jax.jit(lambda dit_params, z: z - T_STAR * model.dit.apply({"params": dit_params}, z, t))
  z_lr = jax.jit(lambda x: model.ae.encode(jax.image.resize(x, (2, 32, 48, 3), "bicubic")))(lr)
  np.testing.assert_allclose(encode(params, lr), z_lr, rtol=1e-5, atol=1e-5)
  want = jax.jit(lambda z: model.ae.decode(z))(x0(model.base, z_lr))
  out = forward(params, lr)
  assert out.shape == (2, 32, 48, 3)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  # With non-zero B the forward is the merged prior's.
  trained = {k: _random_b(rng, v) for k, v in params.items()}
  merged = lora.merge(model.base, trained["dit_lora"])
  z = encode(trained, lr)
  np.testing.assert_allclose(jax.jit(lambda p, z: model.one_step(p, z))(trained, z), x0(merged, z),
                             rtol=1e-4, atol=1e-4)
  assert not np.allclose(z, z_lr, atol=1e-4)


def test_the_multistep_baseline_starts_as_the_prior(rng):
  """z_lr's input weights are zero: the conditional velocity is the prior's whatever z_lr is."""
  ae, dit, base = _parts(rng)
  cond = dit.clone(out_channels=LAT)
  kernel = base["patch_embed"]["kernel"]
  widened = {**base, "patch_embed": {**base["patch_embed"],
                                     "kernel": jnp.concatenate([kernel, jnp.zeros_like(kernel)], 0)}}
  x = jnp.asarray(rng.normal(size=(2, 3, 4, LAT)), jnp.float32)
  z_lr = jnp.asarray(rng.normal(size=(2, 3, 4, LAT)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=2), jnp.float32)
  np.testing.assert_allclose(cond.apply({"params": widened}, jnp.concatenate([x, z_lr], -1), t),
                             dit.apply({"params": base}, x, t), rtol=1e-5, atol=1e-5)
  model = onestep.SR("multistep", ae, cond, None, T_STAR, SCALE, 1.0, sample_steps=3)
  out = model({"dit": widened}, _lr(rng), jax.random.PRNGKey(1))
  assert out.shape == (2, 32, 48, 3) and np.all(np.isfinite(out))


def test_encoder_free_projects_unshuffled_pixels(rng):
  ae, dit, base = _parts(rng)
  decoder = dcae.Decoder(SPEC)
  model = onestep.SR("encoder_free", ae, dit, None, T_STAR, SCALE, 1.0, decoder=decoder)
  assert model.pixel_factor == 1
  lr = _lr(rng)
  proj = {"kernel": jnp.asarray(rng.normal(size=(3, LAT)), jnp.float32),
          "bias": jnp.asarray(rng.normal(size=(LAT,)), jnp.float32)}
  params = {"proj": proj, "dit": base, "decoder": ae.params["decoder"]}
  np.testing.assert_allclose(model.encode(params, lr), lr @ proj["kernel"] + proj["bias"], rtol=1e-6)
  z = model.one_step(params, model.encode(params, lr))
  np.testing.assert_allclose(model(params, lr), ae.decode(z), rtol=1e-5, atol=1e-5)
  assert model.num_params(params) == sum(a.size for a in jax.tree.leaves(params))


def test_losses_compose_and_vsd_is_zero_at_the_start(rng, key):
  """L2 + w (1 - SSIM) of the decoded one-step output; with the fake LoRA at zero the fake score is
  the prior, so the VSD term is exactly 0 while the fake score's flow loss is not."""
  model, params = _onestep(rng)
  params["fake_lora"] = lora.init_lora(model.base, [r"attn/qkv/kernel"], 2, key)
  batch = {"lr": _lr(rng), "hr": jnp.asarray(rng.uniform(-1, 1, size=(2, 32, 48, 3)), jnp.float32)}
  config = ml_collections.ConfigDict({"sr": {"ssim_weight": 0.5, "vsd_weight": 1.0}})
  # Compiled: run op by op, the DC-AE and DiT forward and backward took 35 s of the suite.
  (loss, terms), grads = jax.jit(jax.value_and_grad(
      lambda p: onestep.sr_losses(model, p, batch, key, config), has_aux=True))(params)
  out = jax.jit(lambda p, lr: model(p, lr))(params, batch["lr"])
  l2 = float(jnp.mean((out - batch["hr"]) ** 2))
  np.testing.assert_allclose(terms["l2"], l2, rtol=1e-5)
  assert float(terms["vsd"]) == 0.0 and float(terms["fake_flow"]) > 0
  np.testing.assert_allclose(loss, l2 + 0.5 * (1 - terms["ssim"]) + terms["fake_flow"], rtol=1e-5)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert np.abs(grads["fake_lora"]["block_0"]["attn"]["qkv"]["lora_b"]).max() > 0


def test_a_sharded_step_with_the_pallas_kernel_matches_one_device(rng):
  """value_and_grad of the one-step loss on 8 fake devices (batch over data x fsdp; the DC-AE's
  LiteMLA runs the linear-attention kernel in interpret mode under shard_map) equals the single-
  device XLA computation."""
  model, params = _onestep(rng, kernel_impl="pallas")
  ref = dataclasses.replace(model, ae=autoencoding.untrained(dcae.DCAE(SPEC, kernel_impl="xla"),
                                                             model.ae.params, latent_scale=1.7))
  params = {k: _random_b(rng, v) for k, v in params.items()}
  batch = {"lr": _lr(rng, b=8, hw=(8, 8)),
           "hr": jnp.asarray(rng.uniform(-1, 1, size=(8, 32, 32, 3)), jnp.float32)}
  config = ml_collections.ConfigDict({"sr": {"ssim_weight": 1.0, "vsd_weight": 0.0}})
  key = jax.random.PRNGKey(3)
  grad = lambda m: jax.jit(jax.value_and_grad(lambda p, b: onestep.sr_losses(m, p, b, key, config)[0]))
  want_value, want_grads = grad(ref)(params, batch)
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1})
  sharded = jax.device_put(batch, sharding.batch_sharding(mesh))
  with sharding.mesh_context(mesh):
    value, grads = grad(model)(params, sharded)
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)


def test_bad_inputs_are_named(rng):
  model, params = _onestep(rng)
  with pytest.raises(ValueError, match=r"multiples of 1"):
    model(params, jnp.zeros((1, 8, 8, 4)))
  free = onestep.SR("encoder_free", model.ae, model.dit, None, T_STAR, 2, 1.0)
  with pytest.raises(ValueError, match="multiples of 2"):
    free({}, jnp.zeros((1, 7, 8, 3)))
  from experiments.configs import sana_sr
  for field, value, message in (("sr.mode", "twostep", "sr.mode"), ("sr.scale", 3, "must divide"),
                                ("sr.t_star", 0.0, "t_star"), ("data.eval_config", "s48", "eval_config"),
                                ("sr.decoder_width", 1.5, "decoder_width")):
    config = sana_sr.get_config("smoke")
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
      onestep.check_config(config)
