"""decoders/autoencoder.py: shapes per factor, the KL and the loss against closed forms, config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core import metrics
from decoders import autoencoder
from experiments.configs import pid_autoencoder
from tests.core.nn.random_params import random_params


def _model(factor):
  config = pid_autoencoder.get_config(f"smoke,{factor}")
  return autoencoder.build_model(config), config


@pytest.mark.parametrize("factor, f", [("f8", 8), ("f4", 4)])
def test_encode_decode_shapes(rng, factor, f):
  model, config = _model(factor)
  assert model.factor == f
  x = jnp.asarray(rng.uniform(-1, 1, size=(2, 32, 16, 3)), jnp.float32)
  params = random_params(model, rng, x, scale=0.1)
  mean, logvar = model.apply({"params": params}, x, method="encode")
  assert mean.shape == logvar.shape == (2, 32 // f, 16 // f, config.model.z_channels)
  lo, hi = autoencoder.LOGVAR_RANGE
  assert float(logvar.min()) >= lo and float(logvar.max()) <= hi
  assert model.apply({"params": params}, mean, method="decode").shape == x.shape
  with pytest.raises(ValueError, match=f"multiples of the factor {f}"):
    model.apply({"params": params}, x[:, :f + 2], method="encode")


def test_kl_matches_the_closed_form(rng):
  mean = rng.normal(size=(3, 2, 2, 4))
  logvar = rng.uniform(-3, 1, size=(3, 2, 2, 4))
  var = np.exp(logvar)
  # KL(N(m, v) || N(0, 1)) = (m^2 + v - 1 - log v) / 2 per element.
  want = (0.5 * (mean ** 2 + var - 1 - logvar)).reshape(3, -1).mean(1)
  np.testing.assert_allclose(autoencoder.kl_to_standard_normal(jnp.asarray(mean), jnp.asarray(logvar)),
                             want, rtol=1e-5)
  assert np.all(np.asarray(autoencoder.kl_to_standard_normal(jnp.zeros((1, 4)), jnp.zeros((1, 4)))) == 0)


@pytest.mark.parametrize("ssim_weight", [0.0, 0.3])
def test_loss_is_l1_plus_weighted_kl_and_ssim(rng, ssim_weight):
  model, config = _model("f4")
  config.loss.update({"kl_weight": 0.01, "ssim_weight": ssim_weight})
  x = jnp.asarray(rng.uniform(-1, 1, size=(2, 16, 16, 3)), jnp.float32)
  params = random_params(model, rng, x, scale=0.1)
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  value, terms = autoencoder.losses(model, params, x, key, config)
  eps = jax.random.normal(key, (2, 4, 4, config.model.z_channels))
  recon, mean, logvar = model.apply({"params": params}, x, eps)
  l1 = np.abs(np.asarray(recon) - np.asarray(x)).reshape(2, -1).mean(1)
  kl = np.asarray(autoencoder.kl_to_standard_normal(mean, logvar))
  np.testing.assert_allclose(terms["l1"], l1.mean(), rtol=1e-5)
  np.testing.assert_allclose(terms["kl"], kl.mean(), rtol=1e-5)
  ssim = np.asarray(metrics.ssim(jnp.clip((recon + 1) / 2, 0, 1), (x + 1) / 2, data_range=1.0))
  want = l1 + 0.01 * kl + ssim_weight * (1 - ssim)
  np.testing.assert_allclose(value, want.mean(), rtol=1e-5)


@pytest.mark.parametrize("field, value, match", [
    ("model.channels", [8, 12, 16], "has 12, not divisible into config.model.num_groups=8"),
    ("data.config", "s16", "crops of 16 px are not a multiple of the autoencoder's factor 32"),
    ("loss.kl_weight", -1.0, "config.loss.kl_weight=-1.0; expected >= 0"),
    ("data.config", "s33", "config.data.config='s33'; expected one of"),
])
def test_bad_configs_are_refused(field, value, match):
  config = pid_autoencoder.get_config("smoke")
  config.model.num_groups = 8
  if field == "data.config" and value == "s16":
    config.model.channels = [8, 8, 8, 8, 8, 8]
  group, name = field.split(".")
  config[group][name] = value
  with pytest.raises(ValueError, match=match):
    autoencoder.check_config(config)
