"""The rectified-flow training task behind `flow_2d` and `flow_images` (registered as "flow_matching").

Later methods reuse these models: `build_model(config)` gives the network, `make_sampler(config)` the
(guided) Euler sampler, and `core.train.restore_params(workdir)` the trained parameters.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from core import data, flow, nn, registry, train, writers


def build_model(config: ml_collections.ConfigDict):
  """The velocity network v(x_t, t, y) named by `config.model.kind` ("mlp" | "dit")."""
  mc = config.model
  dtype = train.compute_dtype(config.train.compute_dtype)
  if mc.kind == "mlp":
    return nn.FlowMLP(width=mc.width, depth=mc.depth, num_classes=mc.num_classes, dtype=dtype)
  if mc.kind == "dit":
    # Optional fields: the output's channels, a structurally pruned model's per-block sizes (sr/).
    per_block = lambda field: None if mc.get(field) is None else tuple(int(v) for v in mc[field])
    return nn.DiT(patch_size=mc.patch_size, width=mc.width, depth=mc.depth, num_heads=mc.num_heads,
                  mlp_ratio=mc.mlp_ratio, num_classes=mc.num_classes, pos_embed=mc.pos_embed,
                  modulation=mc.modulation, mlp=mc.mlp, attn_impl=mc.attention, dtype=dtype,
                  out_channels=mc.get("out_channels"), block_heads=per_block("block_heads"),
                  block_mlp_hidden=per_block("block_mlp_hidden"))
  raise ValueError(f"config.model.kind={mc.kind!r}; expected one of ['dit', 'mlp']")


Sources = Callable[[str], data.InMemorySource]


def dataset_sources(config: ml_collections.ConfigDict) -> Sources:
  """split -> the examples of config.data's registered dataset (what `build` trains on)."""
  return lambda split: data.load_in_memory(config.data.name, split, config=config.data.config)


def example_shape(config: ml_collections.ConfigDict, sources: Sources | None = None) -> tuple[int, ...]:
  """Shape of one training example x0 (without the batch dimension)."""
  if sources is None:
    source = data.load(config.data.name, "train", config=config.data.config)
  else:
    source = sources("train")
  return tuple(np.asarray(source[0][config.data.field]).shape)


def to_model_input(example: dict, rng: np.random.Generator, config: ml_collections.ConfigDict) -> dict:
  """One raw example -> {"x": float32 (images in [-1, 1]), "y": int32 label (0 when unconditional)}.

  With config.data.unseen_labels_null, a label >= model.num_classes becomes the null label
  num_classes (the unconditional branch of CFG); otherwise labels are taken as they are."""
  if config.data.field == "image":
    if config.data.get("random_flip", False):
      example = data.random_flip(example, rng)
    example = data.to_float(example, rng)
  y = int(example[config.data.label_field]) if config.data.label_field else 0
  if config.data.get("unseen_labels_null") and y >= config.model.num_classes:
    y = config.model.num_classes    # a class the model lacks (e.g. a held-out photo): the null label
  return {"x": np.asarray(example[config.data.field], np.float32), "y": np.int32(y)}


def model_inputs(config: ml_collections.ConfigDict, split: str, limit: int | None = None,
                 sources: Sources | None = None) -> dict:
  """The first `limit` examples (default all) of `split` as the model sees them, stacked:
  {"x": float32 [N, *example_shape], "y": int32 [N]}; augmentations draw from a fixed rng."""
  source = (sources or dataset_sources(config))(split)
  n = len(source) if limit is None else min(limit, len(source))
  rng = np.random.default_rng(0)
  rows = [to_model_input(source[i], rng, config) for i in range(n)]
  return {k: np.stack([r[k] for r in rows]) for k in ("x", "y")}


def make_sampler(config: ml_collections.ConfigDict, model=None) -> Callable:
  """(params, x_T, y) -> x_0 by Euler on the shifted grid of `config.flow`, with CFG when conditional.

  x_T: [B, *example_shape] standard normal; y: int [B] (ignored when unconditional).
  """
  model = model or build_model(config)
  fc, num_classes = config.flow, config.model.num_classes
  grid = flow.time_grid(fc.sample_steps, shift=fc.sample_shift)

  def sample(params, x_T, y):
    velocity = lambda x, t, y: model.apply({"params": params}, x, t, y)
    if num_classes and fc.cfg_scale != 1.0:
      fn = flow.guided(velocity, y, jnp.full_like(y, num_classes), fc.cfg_scale)
    else:
      fn = lambda x, t: velocity(x, t, y if num_classes else None)
    return flow.euler_sample(fn, x_T, grid)

  return jax.jit(sample)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The flow_matching fields with a fixed set of values (before anything is built)."""
  registry.check_choices(config, {"model.kind": ("dit", "mlp"), "flow.time_kind": flow.TIME_KINDS})
  # config_names names the registered datasets when data.name is not one of them.
  data.check_config(config.data.name, config.data.config)
  if config.model.kind == "dit":
    registry.check_choices(config, {"model.modulation": nn.dit.MODULATIONS, "model.mlp": nn.dit.MLPS,
                                    "model.pos_embed": nn.dit.POS_EMBEDS})


@registry.register("flow_matching", check=check_config)
def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> train.Task:
  del workdir     # a flow_matching run needs no other run
  return make_task(config, dataset_sources(config))


def make_task(config: ml_collections.ConfigDict, sources: Sources,
              to_image: Callable[[np.ndarray], np.ndarray] | None = None) -> train.Task:
  """The flow_matching task on the examples `sources(split)` gives (config.data.field of each), so
  other tasks can train it on data of their own (decoders/latent_flow.py: autoencoder latents);
  to_image maps samples to images [N, H, W, C] in [-1, 1] for the sample hook's picture."""
  dc, fc, num_classes = config.data, config.flow, config.model.num_classes
  model = build_model(config)
  shape = example_shape(config, sources)

  def init_params(key):
    x = jnp.zeros((2, *shape), jnp.float32)
    y = jnp.zeros((2,), jnp.int32) if num_classes else None
    return model.init(key, x, jnp.full((2,), 0.5), y)["params"]

  def loss_batch(params, batch, key):
    drop_key, flow_key = jax.random.split(key)
    x0 = batch["x"]
    y = None
    if num_classes:
      y = flow.drop_labels(drop_key, batch["y"], fc.label_drop_prob, num_classes)
    x_t, t, _, eps = flow.flow_matching_batch(flow_key, x0, time_kind=fc.time_kind, mean=fc.time_mean,
                                              std=fc.time_std, shift=fc.shift)
    v = model.apply({"params": params}, x_t, t, y)
    return flow.flow_matching_loss(v.astype(jnp.float32), x0, eps), {}

  def train_data(process_index, process_count):
    return data.BatchIterator(sources("train"), global_batch_size=config.train.global_batch_size, seed=config.seed,
                              process_index=process_index, process_count=process_count,
                              transform=lambda ex, rng: to_model_input(ex, rng, config))

  def loss(params, batch, key, carry):
    value, metrics = loss_batch(params, batch, key)
    return value, metrics, carry

  eval_batch = model_inputs(config, dc.eval_split, limit=int(fc.eval_size), sources=sources)
  eval_loss = jax.jit(lambda p, k: loss_batch(p, eval_batch, k)[0])

  def evaluate(params, step, workdir):
    # Average over a few fixed keys: one draw of (t, eps) per example is a noisy estimate.
    keys = jax.random.split(jax.random.PRNGKey(1234), 4)
    return {"loss": float(np.mean([eval_loss(params, k) for k in keys]))}

  sampler = make_sampler(config, model)
  n = int(fc.num_samples)
  noise = jax.random.normal(jax.random.PRNGKey(4321), (n, *shape))
  labels = jnp.arange(n, dtype=jnp.int32) % max(num_classes, 1)

  def sample(params, step, workdir):
    """Writes samples/step_<step>.{png,npy}; returns the picture as "grid" (TensorBoard)."""
    x = np.asarray(sampler(params, noise, labels))
    shown = x if to_image is None else np.asarray(to_image(x))
    if shown.ndim == 4:     # images: one column per class, enlarged to >= 64 pixels a side
      picture = writers.image_grid(shown, ncol=max(num_classes, int(np.ceil(np.sqrt(n)))),
                                   scale=max(1, -(-64 // shown.shape[1])))
    else:
      picture = scatter_image(x, eval_batch["x"])
    out = os.path.join(workdir, "samples", f"step_{step:07d}")
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(out), exist_ok=True)
      # The PNG first: a run killed between the two leaves the .npy missing, never a lone .npy.
      writers.replace_atomically(out + ".png", lambda p: writers.save_image(picture, p))
      writers.replace_atomically(out + ".npy", lambda p: np.save(p, x))
    return {"grid": picture}

  return train.Task(init_params=init_params, loss=loss, train_data=train_data,
                    evaluate=evaluate, sample=sample)


def scatter_image(samples_Nx2: np.ndarray, data_Mx2: np.ndarray) -> np.ndarray:
  """Side-by-side scatter plots of model samples and held-out data points: uint8 [H, W, 3]."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure   # no pyplot: leaves a notebook's backend alone
  fig = Figure(figsize=(8, 4), dpi=80)
  canvas = FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2, sharex=True, sharey=True)
  for ax, pts, title in ((axes[0], samples_Nx2, f"{len(samples_Nx2)} samples"),
                         (axes[1], data_Mx2, f"{len(data_Mx2)} held-out data points")):
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
    ax.set_title(title)
    ax.set_xlabel("x[0]")
    ax.set_aspect("equal")
  axes[0].set_ylabel("x[1]")
  fig.tight_layout()
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()
