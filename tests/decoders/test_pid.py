"""decoders/pid.py, adapter.py and task.py: alignment, the adapter's no-op start and its gates, the pixel
path against slow loops, the loss terms against closed forms, a sharded step with the Pallas gate."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from core import sharding
from core.nn import MultiHeadAttention, sincos_2d
from decoders import adapter as adapter_lib, pid, task
from experiments.configs import pid as pid_config
from tests.core.nn.random_params import random_params

B, HR, P = 2, 16, 4          # 16 px images in 4 px patches: a 4x4 grid


def _backbone(**kw):
  return pid.PixelDiT(**{**dict(patch_size=P, width=16, depth=3, num_heads=2, mlp_hidden=32,
                                caption_tokens=2, pixel_channels=4, pixel_depth=2, pixel_width=16,
                                pixel_heads=2), **kw})


def _pid(gate_kind="token", gate_impl="xla", colour_scale=2, depth=3):
  bb = _backbone(depth=depth)
  ad = adapter_lib.Adapter(width=16, num_injections=-(-depth // 2) + 1, hidden=8, num_res_blocks=1, gate_kind=gate_kind,
                           gate_impl=gate_impl, colour_scale=colour_scale)
  return pid.PiD(bb, ad, inject_every=2), pid.PiD(bb, None, inject_every=2)


def _inputs(rng, b=B, latent_hw=2, c=4):
  x = jnp.asarray(rng.normal(size=(b, HR, HR, 3)), jnp.float32)
  t = jnp.asarray(rng.uniform(0, 1, size=(b,)), jnp.float32)
  z = jnp.asarray(rng.normal(size=(b, latent_hw, latent_hw, c)), jnp.float32)
  sigma = jnp.asarray(rng.uniform(0, 1, size=(b,)), jnp.float32)
  return x, t, z, sigma


def test_align_to_grid_upsamples_folds_or_keeps(rng):
  z = rng.normal(size=(2, 2, 3, 5)).astype(np.float32)
  up = adapter_lib.align_to_grid(jnp.asarray(z), (4, 6))
  np.testing.assert_array_equal(up, np.repeat(np.repeat(z, 2, axis=1), 2, axis=2))
  fine = rng.normal(size=(2, 8, 12, 3)).astype(np.float32)
  folded = np.asarray(adapter_lib.align_to_grid(jnp.asarray(fine), (4, 6)))
  assert folded.shape == (2, 4, 6, 12)
  for i, j, di, dj in [(0, 0, 0, 0), (3, 5, 1, 1), (2, 1, 0, 1), (1, 4, 1, 0)]:
    # channel (di * 2 + dj) * c + k of cell (i, j) is the latent at (2i + di, 2j + dj), channel k
    np.testing.assert_array_equal(folded[:, i, j, (di * 2 + dj) * 3:(di * 2 + dj + 1) * 3],
                                  fine[:, 2 * i + di, 2 * j + dj])
  np.testing.assert_array_equal(adapter_lib.align_to_grid(jnp.asarray(fine), (8, 12)), fine)
  with pytest.raises(ValueError, match="neither divides"):
    adapter_lib.align_to_grid(jnp.asarray(fine), (6, 9))
  with pytest.raises(ValueError, match="aspect ratios"):
    adapter_lib.align_to_grid(jnp.asarray(fine), (4, 4))


def _split(params):
  return {"backbone": params["backbone"]}


@pytest.mark.parametrize("gate_kind", ["channel", "token"])
def test_a_fresh_adapter_is_exactly_a_no_op(rng, gate_kind):
  model, plain = _pid(gate_kind)
  x, t, z, sigma = _inputs(rng)
  fresh = meta.unbox(model.init(jax.random.PRNGKey(int(rng.integers(1 << 30))), x, t, z, sigma)["params"])
  # A trained-looking backbone (random everywhere, its zero-initialised outputs included).
  backbone = random_params(plain, rng, x, t, scale=0.3)["backbone"]
  params = {**fresh, "backbone": backbone}
  want = plain.apply({"params": {"backbone": backbone}}, x, t)
  assert float(jnp.abs(want).max()) > 1e-3
  got = model.apply({"params": params}, x, t, z, sigma)
  np.testing.assert_array_equal(got, want)
  for i in range(3):
    gate = params["adapter"][f"gate_{i}"]
    np.testing.assert_array_equal(gate["b"], 2.0)
    np.testing.assert_allclose(np.exp(gate["log_alpha"]), 5.0, rtol=1e-6)
    assert gate["w"].shape == (32, 16 if gate_kind == "channel" else 1)
    np.testing.assert_array_equal(params["adapter"][f"head_{i}"]["kernel"], 0.0)


@pytest.mark.parametrize("gate_kind", ["channel", "token"])
def test_each_injection_is_the_sigma_gate_formula(rng, gate_kind):
  """inject(i) = x + sigmoid([x, lq] w_i + b_i - exp(log_alpha_i) sigma) lq, with its own gate; with w
  at 0 the gate is sigmoid(2 - 5 sigma), the paper's initial schedule."""
  ad = adapter_lib.Adapter(width=16, num_injections=3, hidden=8, num_res_blocks=1, gate_kind=gate_kind,
                           gate_impl="xla")
  z = jnp.asarray(rng.normal(size=(B, 2, 2, 4)), jnp.float32)
  x = rng.normal(size=(B, 16, 16)).astype(np.float32)
  lq = rng.normal(size=(B, 16, 16)).astype(np.float32)
  sigma = rng.uniform(0, 1, size=(B,)).astype(np.float32)
  def everything(m, z):      # the heads and every gate
    lq, _ = m(z, (4, 4))
    return [m.inject(i, lq[i], lq[i], jnp.zeros((B,))) for i in range(3)]

  params = meta.unbox(ad.init(jax.random.PRNGKey(0), z, method=everything)["params"])
  for i in range(3):
    params[f"gate_{i}"]["log_alpha"] = jnp.float32(rng.normal())     # distinct per gate
  sig = lambda a: 1 / (1 + np.exp(-a))
  for i in range(3):
    out = ad.apply({"params": params}, i, jnp.asarray(x), jnp.asarray(lq), jnp.asarray(sigma),
                   method="inject")
    g = params[f"gate_{i}"]
    logit = (np.concatenate([x, lq], -1) @ np.asarray(g["w"]) + np.asarray(g["b"])
             - np.exp(float(g["log_alpha"])) * sigma[:, None, None])
    np.testing.assert_allclose(out, x + sig(logit) * lq, rtol=1e-5, atol=1e-5)
  zero = {**params, "gate_0": {"w": jnp.zeros_like(params["gate_0"]["w"]), "b": params["gate_0"]["b"],
                               "log_alpha": jnp.float32(math.log(5.0))}}
  out = ad.apply({"params": zero}, 0, jnp.asarray(x), jnp.ones_like(lq), jnp.asarray(sigma),
                 method="inject")
  np.testing.assert_allclose(np.asarray(out) - x, np.broadcast_to(sig(2 - 5 * sigma)[:, None, None],
                                                                    x.shape), rtol=1e-5, atol=1e-6)


def test_sigma_lat_acts_only_through_the_gates_and_dropping_the_latent_is_the_backbone(rng):
  model, plain = _pid("channel")
  x, t, z, sigma = _inputs(rng)
  params = random_params(model, rng, x, t, z, sigma, scale=0.3)
  apply = lambda p, s, keep=None: np.asarray(model.apply({"params": p}, x, t, z, s, keep))
  a, b = apply(params, jnp.zeros((B,))), apply(params, jnp.full((B,), 0.7))
  assert np.abs(a - b).max() > 1e-4
  # exp(log_alpha) = 0: sigma has nowhere else to go.
  deaf = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.full_like(v, -200.0) if "log_alpha" in jax.tree_util.keystr(path) else v,
      params)
  np.testing.assert_array_equal(apply(deaf, jnp.zeros((B,))), apply(deaf, jnp.full((B,), 0.7)))
  # keep = 0 drops the latent: exactly the backbone without an adapter.
  keep = jnp.asarray([0.0, 1.0])
  mixed = apply(params, sigma, keep)
  alone = np.asarray(plain.apply({"params": _split(params)}, x, t))
  np.testing.assert_array_equal(mixed[0], alone[0])
  np.testing.assert_allclose(mixed[1], apply(params, sigma)[1], rtol=1e-6, atol=1e-6)
  assert np.abs(mixed[1] - alone[1]).max() > 1e-4


def _rms(x):
  return x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6)


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_pixel_block_matches_a_per_pixel_loop(rng):
  """Per-pixel, per-channel adaLN, the linear compression of a patch's pixels to one token and the
  expansion back, against explicit loops over patches and pixels."""
  n, pp, ch, d, width = 4, 9, 4, 12, 8
  block = pid.PixelBlock(token_width=width, num_heads=2)
  x = rng.normal(size=(B, n, pp, ch)).astype(np.float32)
  s = rng.normal(size=(B, n, d)).astype(np.float32)
  rope = jnp.asarray(rng.uniform(0, 3, size=(n, width // 2 // 2)), jnp.float32)
  params = random_params(block, rng, jnp.asarray(x), jnp.asarray(s), rope, scale=0.3)
  got = np.asarray(block.apply({"params": params}, jnp.asarray(x), jnp.asarray(s), rope))
  ada, comp, exp = (jax.tree.map(np.asarray, params[k]) for k in ("adaln", "compress", "expand"))
  mlp = jax.tree.map(np.asarray, params["mlp"])
  want = np.empty_like(x)
  tokens = np.zeros((B, n, width), np.float32)
  mods = {}
  for b in range(B):
    for i in range(n):
      m = (s[b, i] @ ada["kernel"] + ada["bias"]).reshape(6, pp, ch)
      mods[b, i] = m
      for j in range(pp):
        h = _rms(x[b, i, j]) * (1 + m[1, j]) + m[0, j]
        tokens[b, i] += h @ comp["kernel"][j * ch:(j + 1) * ch]
      tokens[b, i] += comp["bias"]
  attn = MultiHeadAttention(2, qk_norm="rms", name="attn")
  attended = np.asarray(attn.apply({"params": params["attn"]}, jnp.asarray(tokens), rope=rope))
  for b in range(B):
    for i in range(n):
      m = mods[b, i]
      back = (attended[b, i] @ exp["kernel"] + exp["bias"]).reshape(pp, ch)
      for j in range(pp):
        y = x[b, i, j] + m[2, j] * back[j]
        h = _rms(y) * (1 + m[4, j]) + m[3, j]
        u = _gelu(h @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"]) @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]
        want[b, i, j] = y + m[5, j] * u
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _rope_np(x_NxHxD, angles_NxD2):
  """Rotates the pairs (x_i, x_{i + D/2}) of every head by the angles (RoFormer, arXiv 2104.09864)."""
  x1, x2 = np.split(x_NxHxD, 2, axis=-1)
  cos, sin = np.cos(angles_NxD2)[:, None], np.sin(angles_NxD2)[:, None]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_joint_block_matches_a_numpy_mmdit_block(rng):
  """One MMDiT block against numpy: each stream's adaLN-Zero, RMSNorm, q/k RMSNorm and SwiGLU, RoPE on
  the image tokens only, and one softmax attention over caption + image tokens, so every token sees
  every other (a block that attended only within its own token, or ignored RoPE, would fail)."""
  n, m, d, heads = 6, 3, 16, 2
  hd = d // heads
  block = pid.JointBlock(num_heads=heads, mlp_hidden=24)
  x, ctx, c = (rng.normal(size=s).astype(np.float32) for s in [(B, n, d), (B, m, d), (B, d)])
  rope = rng.uniform(0, 6, size=(n, hd // 2)).astype(np.float32)
  args = tuple(jnp.asarray(a) for a in (x, ctx, c, rope))
  params = jax.tree.map(np.asarray, random_params(block, rng, *args, scale=0.3))
  got_x, got_ctx = (np.asarray(a) for a in block.apply({"params": jax.tree.map(jnp.asarray, params)},
                                                        *args))
  silu = lambda u: u / (1 + np.exp(-u))
  lin = lambda p, u: u @ p["kernel"] + p["bias"] if "bias" in p else u @ p["kernel"]
  for b in range(B):
    streams, qkv, mods = {"x": x[b], "ctx": ctx[b]}, {}, {}
    for name, h in streams.items():
      mods[name] = lin(params[f"{name}_adaln"]["linear"], silu(c[b])).reshape(6, d)
      u = _rms(h) * (1 + mods[name][1]) + mods[name][0]
      q, k, v = (a.reshape(-1, heads, hd) for a in np.split(lin(params[f"{name}_qkv"], u), 3, -1))
      q = _rms(q) * params[f"{name}_q_norm"]["scale"]
      k = _rms(k) * params[f"{name}_k_norm"]["scale"]
      qkv[name] = (q, k, v)
    q = np.concatenate([qkv["ctx"][0], _rope_np(qkv["x"][0], rope)])
    k = np.concatenate([qkv["ctx"][1], _rope_np(qkv["x"][1], rope)])
    v = np.concatenate([qkv["ctx"][2], qkv["x"][2]])
    logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    o = np.einsum("hqk,khd->qhd", w / w.sum(-1, keepdims=True), v).reshape(m + n, d)
    for name, o_s, got in (("ctx", o[:m], got_ctx), ("x", o[m:], got_x)):
      mod, h = mods[name], streams[name]
      h = h + mod[2] * lin(params[f"{name}_out"], o_s)
      u = _rms(h) * (1 + mod[4]) + mod[3]
      gate, up = np.split(lin(params[f"{name}_mlp"]["fc1"], u), 2, -1)
      h = h + mod[5] * lin(params[f"{name}_mlp"]["fc2"], silu(gate) * up)
      np.testing.assert_allclose(got[b], h, rtol=1e-4, atol=1e-4)


def test_pixel_path_embedding_and_shapes(rng):
  bb = _backbone()
  x, t, _, _ = _inputs(rng)
  params = random_params(bb, rng, x, t, method=lambda m, x, t: m.embed(x, t))
  tokens, caption, t_emb, pix = bb.apply({"params": params}, x, t, method="embed")
  n = (HR // P) ** 2
  assert tokens.shape == (B, n, 16) and caption.shape == (B, 2, 16) and t_emb.shape == (B, 16)
  assert pix.shape == (B, n, P * P, 4)
  pe = np.asarray(sincos_2d(HR, HR, 4)).reshape(HR, HR, 4)
  k, bias = np.asarray(params["pixel_embed"]["kernel"]), np.asarray(params["pixel_embed"]["bias"])
  for row, col in [(0, 0), (5, 9), (15, 15), (4, 3)]:
    token, j = (row // P) * (HR // P) + col // P, (row % P) * P + col % P
    np.testing.assert_allclose(pix[:, token, j], np.asarray(x)[:, row, col] @ k + bias + pe[row, col],
                               rtol=1e-5, atol=1e-5)
  model, _ = _pid()
  with pytest.raises(ValueError, match="multiples of the patch size 4"):
    model.init(jax.random.PRNGKey(0), x[:, :14], t)
  v, colour = model.apply({"params": random_params(model, rng, *_inputs(rng), scale=0.1)},
                          *_inputs(rng), return_colour=True)
  assert v.shape == (B, HR, HR, 3) and colour.shape == (B, HR // P * 2, HR // P * 2, 3)


def test_colour_loss_against_numpy(rng):
  pred = rng.uniform(-1, 1, size=(3, 4, 5, 3))
  lr = rng.uniform(-1, 1, size=(3, 4, 5, 3))
  sigma = rng.uniform(0, 0.8, size=(3,))
  m = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
  ycc = lambda x: ((x + 1) / 2) @ m.T + np.array([0, 0.5, 0.5])
  want = (1 - sigma) * np.sqrt((ycc(pred) - ycc(lr)) ** 2 + 1e-6).reshape(3, -1).mean(1)
  got = task.colour_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(lr, jnp.float32),
                         jnp.asarray(sigma, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Full-range YCbCr: white is (1, 1/2, 1/2), pure red's Cr is 1.
  np.testing.assert_allclose(task.rgb_to_ycbcr(jnp.ones(3)), [1, 0.5, 0.5], atol=1e-6)
  np.testing.assert_allclose(task.rgb_to_ycbcr(jnp.asarray([1.0, 0, 0]))[2], 1.0, atol=1e-6)


def test_latent_corruption_and_time_shift(key):
  z = jax.random.normal(key, (4096, 2, 2, 4))
  z_sigma, sigma = task.corrupt_latent(jax.random.fold_in(key, 1), z, sigma_max=0.8, prob=0.75)
  sigma = np.asarray(sigma)
  assert 0.0 <= sigma.min() and sigma.max() <= 0.8
  zero = np.mean(sigma == 0)
  assert abs(zero - 0.25) < 6 * math.sqrt(0.25 * 0.75 / 4096)   # 6 standard errors
  # z_sigma = (1 - sigma) z + sigma eps: where sigma = 0 the latent is untouched ...
  np.testing.assert_array_equal(np.asarray(z_sigma)[sigma == 0], np.asarray(z)[sigma == 0])
  # ... and the noise recovered from the rest is standard normal.
  on = sigma > 0.05
  eps = (np.asarray(z_sigma)[on] - (1 - sigma[on, None, None, None]) * np.asarray(z)[on]) \
      / sigma[on, None, None, None]
  assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1) < 0.05
  config = pid_config.get_config("cpu")
  assert task.pixel_shift(config, 128) == pytest.approx(6 * math.sqrt(128 / 2048)) == 1.5
  config.pid.shift = 3.0
  assert task.pixel_shift(config, 128) == 3.0


class _PoolEncoder:
  """A stand-in for the frozen autoencoder: 4x4 average pooling of the LR image, times 2."""

  def encode(self, lr):
    b, h, w, c = lr.shape
    return 2.0 * lr.reshape(b, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4))


def _loss_config(mode="adapter", **pid_fields):
  config = pid_config.get_config("smoke")
  config.pid.update({"mode": mode, "scale": 2, **pid_fields})
  return config


def test_loss_terms_compose_as_documented(rng, key):
  """drop_prob = 1 gives exactly the backbone-alone flow loss on the same draws; the total is
  flow + colour_weight x colour; in adapter mode no gradient reaches the backbone (the optimiser's
  trainable mask freezes it as well)."""
  model, plain = _pid("token", colour_scale=2, depth=1)
  x, t, z, sigma = _inputs(rng, latent_hw=2, c=3)
  params = random_params(model, rng, x, t, z, sigma, scale=0.2)
  enc = _PoolEncoder()
  hr = jnp.clip(x, -1, 1)
  dropped_cfg, alone_cfg, kept_cfg = (_loss_config(drop_prob=1.0), _loss_config("pretrain"),
                                      _loss_config(drop_prob=0.0))

  @jax.jit        # one compilation for the three computations (eagerly they take twice as long)
  def losses_and_grads(params):
    dropped, terms = task.pid_losses(model, params, hr, key, dropped_cfg, enc)
    alone, _ = task.pid_losses(plain, _split(params), hr, key, alone_cfg, None)
    grads = jax.grad(lambda p: task.pid_losses(model, p, hr, key, kept_cfg, enc)[0])(params)
    return dropped, terms, alone, grads

  dropped, terms, alone, grads = losses_and_grads(params)
  np.testing.assert_allclose(terms["flow"], alone, rtol=1e-6)
  np.testing.assert_allclose(dropped, terms["flow"] + 0.8 * terms["colour"], rtol=1e-6)
  assert float(terms["colour"]) > 0
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["backbone"]))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["adapter"])) > 0


def test_downsample_is_antialiased_bicubic(rng):
  hr = rng.uniform(-1, 1, size=(1, 16, 16, 3)).astype(np.float32)
  lr = np.asarray(task.downsample(jnp.asarray(hr), 4))
  assert lr.shape == (1, 4, 4, 3)
  # Antialiased: a 4x downsampling of a fine checkerboard is near its mean, not aliased to +-1.
  checker = np.where((np.add.outer(np.arange(16), np.arange(16)) % 2) == 0, 1.0, -1.0)
  flat = np.asarray(task.downsample(jnp.asarray(np.broadcast_to(checker[None, ..., None], (1, 16, 16, 3)),
                                                jnp.float32), 4))
  assert np.abs(flat).max() < 0.1
  with pytest.raises(ValueError, match="not divisible by the scale 3"):
    task.downsample(jnp.asarray(hr), 3)


@pytest.mark.parametrize("field, value, match", [
    ("pid.mode", "distil", "pid.mode"),
    ("pid.scale", 3, "multiples of config.model.patch_size=16 and config.pid.scale=3"),
    ("model.pixel_channels", 6, "pixel_channels=6"),
    ("pid.sigma_max", 1.5, "sigma_max=1.5"),
    ("model.adapter.gate_kind", "pixel", "gate_kind"),
])
def test_bad_config_fields_are_named(field, value, match):
  from core import registry
  import experiments.tasks  # noqa: F401
  config = pid_config.get_config("smoke")
  section, name = field.rsplit(".", 1)
  node = config
  for part in section.split("."):
    node = node[part]
  node[name] = value
  with pytest.raises(ValueError, match=match):
    registry.check(config)


def test_paper_preset_has_the_published_size():
  """~1.40 B parameters: 14 joint blocks of ~85 M, 2 pixel blocks of ~52.5 M, a ~98 M adapter."""
  config = pid_config.get_config("paper")
  model = task.build_model(config)
  x, t, z = jnp.zeros((1, 256, 256, 3)), jnp.zeros((1,)), jnp.zeros((1, 8, 8, 4))
  shapes = meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t, z,
                                                        jnp.zeros((1,)))["params"]))
  count = lambda tree: sum(math.prod(a.shape) for a in jax.tree.leaves(tree))
  assert 1.38e9 < count(shapes) < 1.42e9
  assert 84e6 < count(shapes["backbone"]["block_0"]) < 86e6
  assert 52e6 < count(shapes["backbone"]["pixel_block_0"]) < 53e6
  assert 96e6 < count(shapes["adapter"]) < 100e6


def test_a_sharded_step_with_the_pallas_gate_matches_one_device(rng, key):
  """value_and_grad of the PiD loss on 8 fake devices (batch over data x fsdp, the gate kernel in
  interpret mode under shard_map) equals the single-device XLA computation."""
  model, _ = _pid("channel", gate_impl="pallas", depth=1)
  ref_model, _ = _pid("channel", gate_impl="xla", depth=1)
  x, t, z, sigma = _inputs(rng, b=8, latent_hw=2, c=3)
  params = random_params(model, rng, x, t, z, sigma, scale=0.2)
  hr = jnp.clip(x, -1, 1)
  enc, config = _PoolEncoder(), _loss_config(drop_prob=0.0)
  grad = lambda m: jax.jit(jax.value_and_grad(lambda p, h: task.pid_losses(m, p, h, key, config, enc)[0]))
  want_value, want_grads = grad(ref_model)(params, hr)
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1})
  hr_sharded = jax.device_put(hr, sharding.batch_sharding(mesh))
  with sharding.mesh_context(mesh):
    value, grads = grad(model)(params, hr_sharded)
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)


def test_the_cascade_starts_as_the_pretrained_backbone(rng):
  """widen_inputs: the decoded-image channels get zero input weights, so the widened backbone computes
  what the pretrained one does, whatever the conditioning image; another architecture is refused."""
  plain = pid.PiD(_backbone(depth=1), None)
  x, t, _, _ = _inputs(rng)
  cond = jnp.asarray(rng.uniform(-1, 1, size=x.shape), jnp.float32)
  backbone = random_params(plain, rng, x, t, scale=0.3)["backbone"]
  fresh = plain.init(jax.random.PRNGKey(0), x, t, image_cond=cond)["params"]["backbone"]
  widened = meta.unbox(task.widen_inputs(fresh, backbone, P))
  assert widened["patch_embed"]["kernel"].shape == (P * P * 6, 16)
  got = plain.apply({"params": {"backbone": widened}}, x, t, image_cond=cond)
  want = plain.apply({"params": {"backbone": backbone}}, x, t)
  # The extra products are exact zeros, but a dot over 6 input channels sums in another order than
  # over 3: float32 rounding, carried through the blocks, of order eps x the output's size.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * float(jnp.abs(want).max()))
  other = random_params(pid.PiD(_backbone(depth=1, width=24, num_heads=2), None), rng, x, t)["backbone"]
  with pytest.raises(ValueError, match="different architecture"):
    task.widen_inputs(fresh, other, P)
