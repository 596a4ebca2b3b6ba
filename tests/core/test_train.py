"""The trainer: sharded step == single-device step, optimiser pieces, EMA, freezing, NaN guard, resume."""
import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import experiments.tasks  # noqa: F401  (registers flow_matching)
from core import registry, sharding, train
from experiments.configs import flow_2d


def _flow_2d_config(**train_overrides):
  c = flow_2d.get_config("smoke")
  c.train.update(train_overrides)
  return c


def _step_once(config, mesh, state_key, batch_np, perturb=0.0):
  """Two train steps from a fresh state; `perturb` adds N(0, perturb^2) noise to the initial params
  (adaLN-Zero models output exactly 0 at init, which would hide what a step computes)."""
  run = train.setup(config, mesh)
  state = run.init(state_key)
  if perturb:
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.fold_in(state_key, 1), len(leaves))
    noisy = [p + perturb * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
    state = state.replace(params=jax.tree.unflatten(tree, noisy))
  for _ in range(2):
    state, metrics = run.step(state, sharding.global_batch(batch_np, mesh))
  return state, metrics


def test_sharded_step_equals_single_device_step(rng):
  config = _flow_2d_config()
  config.model.width = 64               # 64x64 kernels: large enough to shard at min_fsdp_size=1024
  config.sharding.min_fsdp_size = 1024
  # SGD keeps the update linear in the gradient; Adam divides by sqrt(v) + 1e-8, so a gradient entry
  # of ~1e-9 whose sign differs under another reduction order moves its parameter by a whole lr.
  config.optim.update({"name": "sgd", "b1": 0.9})
  # The runs differ only in the order of float32 sums (the batch's 64 terms split over 8 shards, the
  # FSDP matmuls): <= 64 * eps * sum(|terms|) per gradient entry, well under the tolerance below
  # (1e-5 of the leaf's largest entry, ~80 eps) unless that entry is itself a cancelled sum. With
  # zero-mean data the 2-entry output bias's gradient, the batch mean of the residual, is one in a
  # few draws per 1e5; data of mean 3 keeps that mean near 3 (at most 4% of the tolerance in 1000
  # draws).
  batch = {"x": (3 + rng.normal(size=(64, 2))).astype(np.float32), "y": np.zeros((64,), np.int32)}
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  one = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  eight = sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1})
  s1, m1 = _step_once(config, one, key, batch)
  s8, m8 = _step_once(config, eight, key, batch)
  specs = [l.sharding.spec for l in jax.tree.leaves(s8.params)]
  assert any("fsdp" in tuple(s) for s in specs), specs          # parameters really are sharded
  assert any(l.addressable_shards[0].data.size < l.size for l in jax.tree.leaves(s8.opt_state)
             if hasattr(l, "addressable_shards") and l.ndim >= 2)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(a)), 1e-6)
  np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-5)


def test_schedule_warmup_then_cosine():
  optim = ml_collections.ConfigDict({"lr": 0.3, "warmup_steps": 10, "schedule": "cosine",
                                     "min_lr_ratio": 0.1})
  s = train.make_schedule(optim, 110)
  for step in (0, 5, 10, 60, 110):
    if step <= 10:
      want = 0.3 * step / 10
    else:
      frac = (step - 10) / 100
      want = 0.03 + (0.3 - 0.03) * 0.5 * (1 + np.cos(np.pi * frac))
    np.testing.assert_allclose(float(s(step)), want, rtol=1e-5, atol=1e-7)
  optim.schedule = "constant"
  np.testing.assert_allclose(float(train.make_schedule(optim, 110)(50)), 0.3, rtol=1e-6)
  optim.schedule = "linear"
  with pytest.raises(ValueError, match="constant"):
    train.make_schedule(optim, 110)


def test_clipping_ema_and_frozen_leaves(rng):
  # b's gradient (2b) is as large as a's, so a clip norm that counted the frozen b would move a.
  params = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(4,)) * 100, jnp.float32)}
  target = jnp.asarray(rng.normal(size=(3, 4)) * 100, jnp.float32)

  # Built directly, not registered: --seeds repeats the test, and a name registers only once.
  loss = lambda p, batch, k, c: (jnp.sum((p["a"] - target) ** 2) + jnp.sum(p["b"] ** 2), {}, c)
  task = train.Task(init_params=lambda k: params, loss=loss, train_data=None,
                    trainable=lambda p: {"a": True, "b": False})
  config = _flow_2d_config()
  config.optim.update({"name": "sgd", "b1": 0.0, "lr": 0.01, "warmup_steps": 0, "schedule": "constant",
                       "grad_clip_norm": 1.0, "ema_decay": 0.9})
  tx, schedule = train.make_optimizer(config.optim, 10, task.trainable(params))
  state = train.init_state(task, tx, jax.random.PRNGKey(0))
  step = jax.jit(train.make_train_step(task, tx, schedule, config))
  state1, metrics = step(state, {})
  grad = 2 * (params["a"] - target)
  # The global norm is over the trainable leaves only (the frozen b is outside the clipped chain).
  clipped = grad * min(1.0, 1.0 / float(jnp.sqrt(jnp.sum(grad ** 2))))
  np.testing.assert_allclose(state1.params["a"], params["a"] - 0.01 * clipped, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(state1.params["b"], params["b"])       # frozen: bitwise unchanged
  # float32 0.9 * a + 0.1 * a1 (constants, products and sum rounded) is within 4 eps of the terms'
  # size of the float64 value; an rtol alone failed where the terms cancel (a ~ 3e-4), in 2e-4 of
  # draws.
  a, a1 = (np.asarray(p["a"], np.float64) for p in (params, state1.params))
  ema = 0.9 * a + 0.1 * a1
  rounding = 4 * np.finfo(np.float32).eps * (0.9 * np.abs(a) + 0.1 * np.abs(a1))
  err = np.abs(state1.ema_params["a"] - ema)
  assert np.all(err <= 1e-6 * np.abs(ema) + rounding), (err, rounding)
  assert int(state1.step) == 1


def test_ema_warmup_follows_its_formula(rng):
  """With optim.ema_warmup the update at step n (0, 1, ...) decays by min(d, (1 + n) / (10 + n)),
  against a float64 loop over the run's own parameters; d = 0.5 is reached at n = 8, so 12 steps
  see both regimes. Each float32 update rounds within a few eps of the terms' size, and the errors
  shrink by the decay each step: 12 steps stay far inside 1e-5 of the largest parameter."""
  target = jnp.asarray(rng.normal(size=(3, 4)) * 10, jnp.float32)
  init = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
  loss = lambda p, batch, k, c: (jnp.sum((p["a"] - target) ** 2), {}, c)
  task = train.Task(init_params=lambda k: init, loss=loss, train_data=None)
  config = _flow_2d_config()
  assert config.optim.ema_warmup is False                   # the base default: a constant decay
  config.optim.update({"name": "sgd", "b1": 0.0, "lr": 0.05, "warmup_steps": 0,
                       "schedule": "constant", "grad_clip_norm": 0.0, "ema_decay": 0.5,
                       "ema_warmup": True})
  tx, schedule = train.make_optimizer(config.optim, 12)
  state = train.init_state(task, tx, jax.random.PRNGKey(0))
  step = jax.jit(train.make_train_step(task, tx, schedule, config))
  ema = np.asarray(init["a"], np.float64)
  scale = np.abs(ema).max()
  for n in range(12):
    state, _ = step(state, {})
    a = np.asarray(state.params["a"], np.float64)
    decay = min(0.5, (1 + n) / (10 + n))
    ema = decay * ema + (1 - decay) * a
    scale = max(scale, np.abs(a).max())
    np.testing.assert_allclose(state.ema_params["a"], ema, rtol=0, atol=1e-5 * scale)


def test_a_field_added_later_keeps_stored_runs_compatible(tmp_path):
  """A workdir's config.json written before optim.ema_warmup existed (also in a config it embeds)
  counts as ema_warmup = False: the same config resumes it, one with the warm-up on does not."""
  config = _flow_2d_config()
  config.base = _flow_2d_config()
  stored = json.loads(config.to_json_best_effort())
  for c in (stored, stored["base"]):
    del c["optim"]["ema_warmup"]
  (tmp_path / "config.json").write_text(json.dumps(stored))
  train.check_config_compatible(str(tmp_path), config)
  for warm in (config, config.base):
    warm.optim.ema_warmup = True
    with pytest.raises(ValueError, match=r"optim.ema_warmup \(False -> True\)"):
      train.check_config_compatible(str(tmp_path), config)
    warm.optim.ema_warmup = False


def test_update_groups_alternate_and_keep_their_state(rng):
  """Group "gen" steps at 5 and 11 (every 6th step), "critic" at the others, "frozen" never: each moves only at its steps, by SGD on its own gradient, bitwise still otherwise."""
  params = {name: jnp.asarray(rng.normal(size=(3,)), jnp.float32) for name in ("g", "c", "t")}
  loss = lambda p, batch, k, c: (sum(jnp.sum(v ** 2) for v in p.values()), {}, c)
  groups = lambda p: ({"g": "gen", "c": "critic", "t": "frozen"},
                      {"gen": lambda n: n % 6 == 5, "critic": lambda n: n % 6 != 5, "frozen": None})
  task = train.Task(init_params=lambda k: params, loss=loss, train_data=None, update_groups=groups)
  config = _flow_2d_config()
  config.optim.update({"name": "sgd", "b1": 0.0, "lr": 0.1, "warmup_steps": 0, "schedule": "constant",
                       "grad_clip_norm": 0.0, "ema_decay": 0.0})
  tx, schedule = train.make_optimizer(config.optim, 12, groups=groups(params))
  state = train.init_state(task, tx, jax.random.PRNGKey(0))
  step = jax.jit(train.make_train_step(task, tx, schedule, config))
  for n in range(12):
    before = jax.tree.map(np.asarray, state.params)
    state, _ = step(state, {})
    for name, moves in (("g", n % 6 == 5), ("c", n % 6 != 5), ("t", False)):
      want = before[name] * (1 - 0.2) if moves else before[name]     # x - 0.1 * 2x
      np.testing.assert_allclose(state.params[name], want, rtol=1e-6)
      if not moves:
        np.testing.assert_array_equal(state.params[name], before[name])
  with pytest.raises(ValueError, match="either trainable or update_groups"):
    train.make_optimizer(config.optim, 12, {"g": True, "c": True, "t": True}, groups(params))


def _nan_task(bad_step):
  @registry.register(f"test_nan_at_{bad_step}")
  def build(config, workdir=None):
    class Data:
      def __init__(self):
        self.k = 0
      def __next__(self):
        self.k += 1
        return {"x": np.full((8, 1), np.nan if self.k == bad_step else 1.0, np.float32)}
      def get_state(self):
        return {"k": self.k}
      def set_state(self, s):
        self.k = s["k"]
    return train.Task(init_params=lambda k: {"w": jnp.ones((3,))},
                      loss=lambda p, b, k, c: (jnp.mean(b["x"]) * jnp.sum(p["w"] ** 2), {}, c),
                      train_data=lambda i, n: Data())
  return f"test_nan_at_{bad_step}"


def test_nan_guard_names_step_and_last_checkpoint(tmp_path):
  config = _flow_2d_config(num_steps=10, checkpoint_every=2, eval_every=0, sample_every=0)
  config.task = _nan_task(5)
  with pytest.raises(train.NonFiniteError, match=r"step 5; last good checkpoint: step 4"):
    train.train(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]


def test_incompatible_config_is_refused_and_run_control_may_change(tmp_path):
  config = _flow_2d_config(num_steps=4, checkpoint_every=2, eval_every=0, sample_every=0)
  train.train(config, str(tmp_path))
  longer = _flow_2d_config(num_steps=6, checkpoint_every=2, eval_every=0, sample_every=0)
  assert train.train(longer, str(tmp_path)) == 6
  other = _flow_2d_config(num_steps=6)
  other.model.width = 48
  with pytest.raises(ValueError, match=r"incompatible config.*model.width \(32 -> 48\)"):
    train.train(other, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "train/loss" in r] == [4, 6]
  params, cfg = train.restore_params(str(tmp_path))
  assert cfg.train.num_steps == 6 and jax.tree.leaves(params)


def test_bfloat16_compute_keeps_float32_master_params(rng):
  from experiments.configs import flow_images
  batch = {"x": rng.uniform(-1, 1, size=(8, 16, 16, 1)).astype(np.float32),
           "y": rng.integers(0, 10, size=(8,)).astype(np.int32)}
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  losses = {}
  for dtype in ("float32", "bfloat16"):
    config = flow_images.get_config("smoke")
    config.train.compute_dtype = dtype
    state, metrics = _step_once(config, mesh, key, batch, perturb=0.1)
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(state.params))
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(state.opt_state) if l.ndim)
    losses[dtype] = float(metrics["loss"])
  assert losses["float32"] != losses["bfloat16"]                     # the cast really happened
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=3e-2)
  with pytest.raises(ValueError, match="compute_dtype='float8'"):
    train.compute_dtype("float8")


def _carry_task(batch_size):
  """A task whose carry is a per-row accumulator and a step counter: pred = (x + acc) . w,
  acc' = acc + x * w[0]. The new carry reads the parameters, so a differentiated carry would change
  the gradient."""
  def loss(params, batch, key, carry):
    pred = (batch["x"] + carry["acc"]) @ params["w"]
    new = {"acc": carry["acc"] + batch["x"] * params["w"][0], "count": carry["count"] + 1}
    return jnp.mean(pred ** 2), {}, new

  return train.Task(
      init_params=lambda key: {"w": jax.random.normal(key, (2,))}, loss=loss, train_data=None,
      init_carry=lambda key: {"acc": jnp.zeros((batch_size, 2)), "count": jnp.zeros((), jnp.int32)})


def test_carry_is_threaded_sharded_not_differentiated_and_checkpointed(tmp_path, rng):
  config = _flow_2d_config()
  config.optim.update({"name": "sgd", "b1": 0.0, "lr": 0.1, "warmup_steps": 0, "grad_clip_norm": 0.0,
                       "schedule": "constant", "ema_decay": 0.0})
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1})
  task = _carry_task(16)
  run = train.setup(config, mesh, task=task)
  state = run.init(jax.random.PRNGKey(rng.integers(1 << 30)))
  for _ in range(2):
    x = rng.normal(size=(16, 2)).astype(np.float32)
    w, acc = np.asarray(state.params["w"]), np.asarray(state.carry["acc"])
    state, _ = run.step(state, sharding.global_batch({"x": x}, mesh))
    np.testing.assert_allclose(np.asarray(state.carry["acc"]), acc + x * w[0], rtol=1e-6, atol=1e-6)
    # d/dw mean(((x + acc) . w)^2) only: the carry update is not differentiated. In float64: the
    # step's float32 mean of 16 terms (a few roundings each) is within 24 eps of the mean of
    # |terms|, which `rounding` allows (an rtol alone failed where w - 0.1 * grad cancels, in 0.3%
    # of draws).
    x64, acc64, w64 = (np.asarray(a, np.float64) for a in (x, acc, w))
    grad = 2 * ((x64 + acc64) @ w64)[:, None] * (x64 + acc64)
    want = w64 - 0.1 * grad.mean(0)
    rounding = 0.1 * 24 * np.finfo(np.float32).eps * np.abs(grad).mean(0)
    err = np.abs(np.asarray(state.params["w"]) - want)
    assert np.all(err <= 1e-5 * np.abs(want) + rounding), (err, want, rounding)
  assert int(state.carry["count"]) == 2
  assert state.carry["acc"].sharding.spec[0] == sharding.BATCH_AXES
  ckpt = train.Checkpointer(str(tmp_path), keep=1)
  ckpt.save(state, {"position": 2}, {"train_seconds": 1.5})
  ckpt.wait()
  restored, data_state, meta = ckpt.restore(2, run.abstract_state, run.shardings)
  assert data_state == {"position": 2} and meta == {"train_seconds": 1.5}
  ckpt.close()
  np.testing.assert_array_equal(np.asarray(restored.carry["acc"]), np.asarray(state.carry["acc"]))


def test_first_ctrl_c_asks_the_loop_to_stop_and_a_second_aborts():
  import signal
  import time
  before = signal.getsignal(signal.SIGINT)
  stop = train._StopSignals()
  try:
    assert stop.received is None
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)                         # the handler runs in the main thread, between bytecodes
    assert stop.received == signal.SIGINT and stop.name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.5)
  finally:
    stop.restore()
  assert signal.getsignal(signal.SIGINT) is before


def test_bad_config_is_refused_before_the_workdir_exists(tmp_path):
  config = _flow_2d_config()
  config.flow.time_kind = "logit"
  with pytest.raises(train.ConfigError, match=r"config.flow.time_kind='logit'; expected one of"):
    train.train(config, str(tmp_path / "run"))
  config = _flow_2d_config()
  config.train.global_batch_size = 12                  # 8 fake devices
  with pytest.raises(train.ConfigError, match="global batch size 12 is not divisible by the 8"):
    train.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


class _LinearAttentionNet(flax.linen.Module):
  """tokens [B, N, 8] -> linear-attention block (Pallas kernel, interpreted) -> MLP -> [B, N, 8]."""

  @flax.linen.compact
  def __call__(self, x):
    from core import nn as cnn
    from core.nn.partitioning import dense
    h = dense(64, (None, "embed"), name="inp")(x)
    h = h + cnn.MultiHeadAttention(num_heads=4, fused_qkv=False, impl="linear",
                                   kernel_impl="pallas", name="attn")(h)
    h = h + cnn.Mlp(hidden=128, name="mlp")(h)
    return dense(8, ("embed", None), name="outp")(h)


def test_linear_attention_kernel_runs_sharded_in_the_train_step(rng):
  """The Pallas linear-attention kernel (interpret mode) inside a data- and model-parallel train
  step on 8 devices: the step equals the one-device step, and the compiled step gathers no
  activations (the kernel runs per shard under shard_map; attention and MLP are head-/mlp-parallel)."""
  net = _LinearAttentionNet()
  config = _flow_2d_config()
  config.optim.update({"name": "sgd", "b1": 0.9, "grad_clip_norm": 0.0})
  config.sharding.min_fsdp_size = 1
  task = train.Task(
      init_params=lambda k: net.init(k, jnp.zeros((1, 16, 8)))["params"],
      loss=lambda p, b, k, c: (jnp.mean((net.apply({"params": p}, b["x"]) - b["y"]) ** 2), {}, c),
      train_data=None)
  batch = {"x": rng.normal(size=(8, 16, 8)).astype(np.float32),
           "y": rng.normal(size=(8, 16, 8)).astype(np.float32)}
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  results = []
  for mesh in (sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]),
               sharding.make_mesh({"data": 4, "fsdp": 1, "model": 2})):
    run = train.setup(config, mesh, task=task)
    state = run.init(key)
    b = sharding.global_batch(batch, mesh)
    hlo = run.step.lower(state, b).compile().as_text()
    state, metrics = run.step(state, b)
    results.append((state, metrics, hlo))
  (s1, m1, _), (s8, m8, hlo8) = results
  assert "all-gather" not in hlo8
  assert any("model" in str(l.sharding.spec) for l in jax.tree.leaves(s8.params))
  np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * max(np.abs(a).max(), 1.0))
