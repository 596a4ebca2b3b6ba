"""Mesh construction, parameter/batch shardings and the shard_map helper on 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from core import sharding


def test_mesh_shape_resolves_minus_one():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "model": 1}, 8) == (4, 2, 1)
  assert sharding.mesh_shape({"data": 2, "fsdp": 2, "model": 2}, 8) == (2, 2, 2)


@pytest.mark.parametrize("cfg, msg", [
    ({"data": 3}, "needs 3 devices"),
    ({"data": -1, "fsdp": 3}, "does not divide"),
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"pipeline": 2}, "unknown axes"),
])
def test_bad_mesh_configs_are_named(cfg, msg):
  with pytest.raises(ValueError, match=msg):
    sharding.mesh_shape(cfg, 8)


def test_param_specs_shard_large_and_replicate_small(rng):
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1})
  tree = {"dense": {"kernel": jnp.asarray(rng.normal(size=(256, 128)), jnp.float32),
                    "bias": jnp.zeros((128,))},
          "conv": {"kernel": jnp.zeros((3, 3, 64, 64))},
          "tiny": {"kernel": jnp.zeros((4, 4))},
          "odd": {"kernel": jnp.zeros((129, 129))}}
  sh = sharding.tree_shardings(tree, mesh, min_fsdp_size=1024)
  assert sh["dense"]["kernel"].spec == P("fsdp", None)
  assert sh["dense"]["bias"].spec == P()
  assert sh["conv"]["kernel"].spec == P(None, None, "fsdp", None)
  assert sh["tiny"]["kernel"].spec == P()
  assert sh["odd"]["kernel"].spec == P(None, None)   # 129 is not divisible by fsdp=2
  placed = jax.device_put(tree["dense"]["kernel"], sh["dense"]["kernel"])
  assert placed.addressable_shards[0].data.shape == (128, 128)
  np.testing.assert_array_equal(np.asarray(placed), np.asarray(tree["dense"]["kernel"]))


def test_model_axis_used_for_output_dim():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  spec = sharding.spec_for("blocks/mlp/kernel", (64, 256), mesh, min_fsdp_size=1)
  assert spec == P("fsdp", "model")


def test_global_batch_is_split_over_batch_axes(rng):
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1})
  x = rng.normal(size=(16, 3)).astype(np.float32)
  g = sharding.global_batch({"x": x}, mesh)["x"]
  assert g.sharding.spec == P(("data", "fsdp"))
  assert {s.data.shape for s in g.addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(g), x)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.batch_size_per_process(12, mesh)


def test_shard_map_helper_matches_unsharded(rng):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  x = jnp.asarray(rng.normal(size=(8, 5, 4, 3)), jnp.float32)   # [B, N, H, D]

  def per_shard(x):   # a per-(batch, head) op, like a Pallas attention kernel
    return x * jnp.sum(x, axis=1, keepdims=True)

  dims = ("batch", None, "heads", None)
  call = jax.jit(lambda x: sharding.shard_kernel(per_shard, (x,), (dims,), dims))
  with jax.set_mesh(mesh):
    out = call(x)
    text = call.lower(x).as_text()
  assert "shard_map" in text or "manual" in text.lower()        # really split per device
  # A batch the batch axes do not divide stays whole on every device (redundant but right).
  odd = x[:5]
  with jax.set_mesh(mesh):
    np.testing.assert_allclose(jax.jit(lambda x: sharding.shard_kernel(per_shard, (x,), (dims,), dims))(odd),
                               per_shard(odd), rtol=1e-6, atol=1e-6)
  # Without a mesh in context it is a plain call.
  np.testing.assert_array_equal(sharding.shard_kernel(per_shard, (x,), (dims,), dims), per_shard(x))
  # Bitwise in practice; another order of the 5-term sum may move it by 4 eps * sum(|x|), which
  # an rtol alone would not allow where the sum cancels.
  rounding = 4 * np.finfo(np.float32).eps * np.abs(x) * np.abs(x).sum(axis=1, keepdims=True)
  err = np.abs(out - per_shard(x))
  assert np.all(err <= 1e-6 * np.abs(per_shard(x)) + rounding), err.max()


def test_initialize_distributed_single_process_is_noop(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID",
              "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  sharding.initialize_distributed()
  assert jax.process_count() == 1
  with pytest.raises(ValueError, match="coordinator"):
    sharding.initialize_distributed(num_processes=2)


def test_layers_declare_axes_so_an_mlps_up_and_down_projections_split_on_opposite_dims():
  """With a model axis, Mlp's fc1 [D, F] splits F and fc2 [F, D] splits F too, i.e. opposite
  dimensions of the two kernels (the name regex alone gives both the same spec); Adam's moments and
  the EMA follow their parameters through the trainer's state shardings."""
  from flax.core import meta
  from core import nn as cnn, train
  mlp = cnn.Mlp(hidden=64)
  boxed = jax.eval_shape(lambda k: mlp.init(k, jnp.zeros((2, 4, 32)))["params"], jax.random.PRNGKey(0))
  declared = sharding.declared_axes(boxed)
  assert declared == {"fc1/kernel": ("embed", "mlp"), "fc1/bias": ("mlp",),
                      "fc2/kernel": ("mlp", "embed"), "fc2/bias": ("embed",)}
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  params = meta.unbox(boxed)
  specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(params, mesh, min_fsdp_size=1,
                                                                 declared=declared))
  assert specs["fc1"]["kernel"] == P("fsdp", "model") and specs["fc2"]["kernel"] == P("model", "fsdp")
  assert specs["fc1"]["bias"] == P("model") and specs["fc2"]["bias"] == P("fsdp")
  fallback = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(params, mesh, min_fsdp_size=1))
  assert fallback["fc1"]["kernel"] == fallback["fc2"]["kernel"] == P("fsdp", "model")
  # Through the trainer: the optimiser's moments are sharded like their parameter.
  tx, _ = train.make_optimizer(ml_collections.ConfigDict(
      {"name": "adamw", "lr": 1e-3, "b1": 0.9, "b2": 0.99, "eps": 1e-8, "weight_decay": 0.0,
       "grad_clip_norm": 1.0, "warmup_steps": 0, "schedule": "constant", "min_lr_ratio": 0.0}), 10)
  task = train.Task(init_params=lambda k: mlp.init(k, jnp.zeros((2, 4, 32)))["params"],
                    loss=None, train_data=None)
  abstract = jax.eval_shape(lambda k: train.init_state(task, tx, k), jax.random.PRNGKey(0))
  config = ml_collections.ConfigDict({"sharding": {"min_fsdp_size": 1}})
  state = train.state_shardings(abstract, mesh, config, declared)
  mu = [s for p, s in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
        if sharding._path_str(p).endswith("mu/fc2/kernel")]
  assert [s.spec for s in mu] == [P("model", "fsdp")]
  assert state.ema_params["fc2"]["kernel"].spec == P("model", "fsdp")
