"""The one training loop every method uses.

A method supplies a `Task` (init, loss, data, hooks) registered by name in `core.registry`; this module
owns everything else: the train state, optax optimiser and schedule, the mixed-precision policy, the
sharded `jax.jit` step with donated state, orbax checkpoints with the data position, resume, the NaN/Inf
guard, SIGTERM and Ctrl-C handling, metrics and progress.

Determinism: the step's key is `fold_in(state.rng, state.step)` and batch k is a pure function of
(seed, k), so a run resumed from a checkpoint computes exactly what an uninterrupted run computes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.core import meta

from core import registry, sharding, writers

PyTree = Any

# Fields that may change between a run and its resumption (they steer the run, not what it computes
# up to the checkpoint). Any other difference makes the checkpoint meaningless for the new config.
RUN_CONTROL_FIELDS = ("train.num_steps", "train.log_every", "train.eval_every", "train.sample_every",
                      "train.checkpoint_every", "train.keep_checkpoints", "mesh", "sharding")
# Fields added to the base config after runs were stored, with the value that computes what the
# trainer computed before them: a workdir's config.json without one (at any depth: a config embeds
# the configs of the runs it builds on) counts as holding that value.
FIELDS_ADDED_LATER = {"optim.ema_warmup": False}


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 []
  params: PyTree         # float32
  opt_state: PyTree
  ema_params: PyTree     # float32; equals params when EMA is off
  rng: jax.Array         # uint32 [2]; the key of step k is fold_in(rng, k)
  carry: PyTree          # the task's state between steps ({} for most tasks), batch-major arrays


@dataclasses.dataclass(frozen=True)
class Task:
  """What a method gives the trainer.

  init_params: key -> float32 parameter pytree (leaves may be boxed with logical axis names).
  loss: (params in the compute dtype, batch of global arrays, key, carry) -> (scalar loss,
    {name: scalar}, new carry). The carry is {} for a task without `init_carry` (return it as is).
  train_data: (process_index, process_count) -> iterator of this host's numpy batch slices with
    `get_state() -> dict` and `set_state(dict)` (e.g. `core.data.pipeline.BatchIterator`).
  evaluate / sample: (params, step, workdir) -> {name: scalar, or uint8 [H, W, 1 | 3] image}; called
    with the EMA parameters every `train.eval_every` / `train.sample_every` steps and at the end (and
    by `evaluate_checkpoint`). Scalars go to metrics.jsonl and TensorBoard, images to TensorBoard;
    `sample` also writes its files (grids) under the workdir.
  trainable: params -> pytree of bools, True where the optimiser may update (LoRA, frozen towers).
  init_carry: key -> pytree of global arrays whose leading dim is the global batch: state a task keeps
    from one step to the next (Relay's rollout buffer, GRPO's sampled batch), checkpointed with the
    train state and sharded like the batch; the new carry is not differentiated.
  update_groups: params -> (pytree of group names like params, {name: step -> bool, or None}): each
    group gets its own copy of the optimiser, applied only at the steps (0, 1, ...) where its
    function is True, its state untouched at the others; None never updates (frozen). DMD2's
    alternating generator / critic updates (decoders/distill.py). Excludes `trainable`.
  """
  init_params: Callable[[jax.Array], PyTree]
  loss: Callable[[PyTree, Mapping[str, jax.Array], jax.Array, PyTree],
                 tuple[jax.Array, Mapping[str, jax.Array], PyTree]]
  train_data: Callable[[int, int], Any]
  evaluate: Callable[[PyTree, int, str], Mapping[str, float]] | None = None
  sample: Callable[[PyTree, int, str], Mapping[str, float]] | None = None
  trainable: Callable[[PyTree], PyTree] | None = None
  init_carry: Callable[[jax.Array], PyTree] | None = None
  update_groups: Callable[[PyTree], tuple[PyTree, Mapping[str, Callable | None]]] | None = None


class NonFiniteError(FloatingPointError):
  pass


class ConfigError(ValueError):
  """A config the trainer refused before writing anything to the workdir."""


# ----------------------------------------------------------------------------------------------
# Optimiser, schedule, precision


def make_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warm-up to `optim.lr`, then cosine decay to `lr * min_lr_ratio` or constant."""
  warmup = int(optim.warmup_steps)
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, optim.lr, warmup, max(num_steps, warmup + 1), end_value=optim.lr * optim.min_lr_ratio)
  if optim.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, max(warmup, 1)), optax.constant_schedule(optim.lr)],
        [warmup])
  raise ValueError(f"config.optim.schedule={optim.schedule!r}; expected one of ['constant', 'cosine']")


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int, trainable: PyTree | None = None,
                   groups: tuple[PyTree, Mapping[str, Callable | None]] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping + AdamW (weight decay on >= 2-D arrays only) or SGD with momentum.

  `trainable` (pytree of bools like params) freezes the False leaves: their updates are exactly zero.
  `groups` (labels, {label: step -> bool or None}) gives each group its own optimiser (clipping
  included), applied only at the steps its function allows (`Task.update_groups`).
  """
  schedule = make_schedule(optim, num_steps)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  if optim.name == "adamw":
    base = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay, mask=decay_mask)
  elif optim.name == "sgd":
    base = optax.sgd(schedule, momentum=optim.b1)
  else:
    raise ValueError(f"config.optim.name={optim.name!r}; expected one of ['adamw', 'sgd']")
  tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), base) if optim.grad_clip_norm else base
  if trainable is not None:
    labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  if groups is not None:
    if trainable is not None:
      raise ValueError("a task gives either trainable or update_groups, not both")
    labels, when = groups
    tx = optax.multi_transform(
        {name: optax.set_to_zero() if fn is None else optax.transforms.conditionally_mask(tx, fn)
         for name, fn in when.items()}, labels)
  return tx, schedule


def compute_dtype(name: str) -> jnp.dtype:
  choices = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  if name not in choices:
    raise ValueError(f"config.train.compute_dtype={name!r}; expected one of {sorted(choices)}")
  return choices[name]


def cast_floating(tree: PyTree, dtype) -> PyTree:
  """Mixed precision: float32 master parameters are cast to the compute dtype for the forward pass."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# ----------------------------------------------------------------------------------------------
# State and step


def init_params(task: Task, key: jax.Array) -> PyTree:
  """The task's parameters with the layers' logical-axis boxes removed (`sharding.declared_axes`
  reads the names from the boxed tree)."""
  return meta.unbox(task.init_params(key))


def init_state(task: Task, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
  init_key, state_key, carry_key = jax.random.split(key, 3)
  params = init_params(task, init_key)
  carry = {} if task.init_carry is None else task.init_carry(carry_key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=params, rng=state_key, carry=carry)


def make_train_step(task: Task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    config: ml_collections.ConfigDict) -> Callable:
  """(state, batch) -> (state, metrics): one optimiser step; jit it with `jit_train_step`."""
  dtype = compute_dtype(config.train.compute_dtype)
  ema_decay = float(config.optim.ema_decay)
  ema_warmup = bool(config.optim.ema_warmup)

  def step_fn(state: TrainState, batch: Mapping[str, jax.Array]):
    key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      loss, metrics, carry = task.loss(cast_floating(params, dtype), batch, key, state.carry)
      return loss.astype(jnp.float32), (metrics, carry)

    (loss, (metrics, carry)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Warm-up: update n = state.step decays by at most (1 + n) / (10 + n), so the EMA soon forgets
    # the initial weights.
    decay = (jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step)) if ema_warmup
             else ema_decay)
    ema = optax.incremental_update(params, state.ema_params, 1.0 - decay) if ema_decay else params
    metrics = {**{k: v.astype(jnp.float32) for k, v in metrics.items()}, "loss": loss,
               "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                         carry=carry), metrics

  return step_fn


class InMesh:
  """A jitted function that is traced, run and lowered under `sharding.mesh_context(mesh, rules)`,
  so `shard_kernel` and the layers' activation constraints see the mesh."""

  def __init__(self, fn: Callable, mesh, rules):
    self.fn, self.mesh, self.rules = fn, mesh, rules

  def __call__(self, *args, **kwargs):
    with sharding.mesh_context(self.mesh, self.rules):
      return self.fn(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with sharding.mesh_context(self.mesh, self.rules):
      return self.fn.lower(*args, **kwargs)


def jit_train_step(step_fn: Callable, state_shardings: PyTree, mesh,
                   rules=sharding.DEFAULT_LOGICAL_AXIS_RULES) -> Callable:
  """The sharded step: explicit in/out shardings, state donated (this is what pjit became), run
  under the mesh (`InMesh`)."""
  return InMesh(jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                         out_shardings=(state_shardings, sharding.replicated(mesh)),
                         donate_argnums=(0,)), mesh, rules)


def state_shardings(abstract_state: TrainState, mesh, config: ml_collections.ConfigDict,
                    declared: Mapping[str, tuple] | None = None) -> PyTree:
  """Shardings of the train state: each parameter (and its optimiser moments and EMA) by the logical
  names its layer declared (`declared`, from `sharding.declared_axes`), else by the path rules; the
  carry like the batch."""
  shard = config.get("sharding", ml_collections.ConfigDict())
  shardings = sharding.tree_shardings(abstract_state, mesh,
                                      min_fsdp_size=int(shard.get("min_fsdp_size", 2**14)),
                                      rules=sharding.axis_rules(config), declared=declared)
  carry = jax.tree.map(lambda a: sharding.batch_sharding(mesh) if a.ndim else sharding.replicated(mesh),
                       abstract_state.carry)
  return shardings.replace(carry=carry)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything the loop needs before its first step. `init(key)` and `step(state, batch)` are jitted."""
  task: Task
  abstract_state: TrainState
  shardings: PyTree
  init: Callable[[jax.Array], TrainState]
  step: Callable


def build_task(config: ml_collections.ConfigDict, workdir: str | None = None) -> Task:
  """The registered task `config.task`, built for a run in `workdir` (a task's paths that are relative,
  such as GRPO's base run, are relative to it)."""
  return registry.get(config.task)(config, workdir)


def setup(config: ml_collections.ConfigDict, mesh, task: Task | None = None,
          workdir: str | None = None) -> Setup:
  """Builds the task (from `config.task` unless given), optimiser, state shardings and jitted step."""
  task = task or build_task(config, workdir)
  boxed = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  abstract_params = meta.unbox(boxed)
  trainable = None if task.trainable is None else task.trainable(abstract_params)
  groups = None if task.update_groups is None else task.update_groups(abstract_params)
  tx, schedule = make_optimizer(config.optim, int(config.train.num_steps), trainable, groups)
  init_fn = lambda key: init_state(task, tx, key)
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  shardings = state_shardings(abstract, mesh, config, sharding.declared_axes(boxed))
  rules = sharding.axis_rules(config)
  return Setup(task=task, abstract_state=abstract, shardings=shardings,
               init=InMesh(jax.jit(init_fn, out_shardings=shardings), mesh, rules),
               step=jit_train_step(make_train_step(task, tx, schedule, config), shardings, mesh,
                                   rules))


# ----------------------------------------------------------------------------------------------
# Checkpoints and the workdir


class Checkpointer:
  """orbax CheckpointManager of {state, data-iterator state, run meta} under `workdir/checkpoints`.

  meta: {"train_seconds": wall-clock seconds the loop has trained up to this step}. create=False opens
  an existing directory for reading only.
  """

  def __init__(self, workdir: str, keep: int = 1_000_000, create: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not create and not os.path.isdir(self.directory):
      raise FileNotFoundError(f"no checkpoints in {workdir} ({self.directory} does not exist)")
    self._mngr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=create),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, state: TrainState, data_state: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    self._mngr.save(int(state.step), force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state)),
        meta=ocp.args.JsonSave(dict(meta))))

  def restore(self, step: int, abstract_state: TrainState, shardings: PyTree):
    """(state placed by `shardings`, data-iterator state, meta) of checkpoint `step`."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, shardings)
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["meta"]

  def restore_saved(self, step: int):
    """The state of checkpoint `step` as saved (a dict of its fields), on this process's first device:
    the shapes come from the checkpoint's metadata, so nothing needs to be built first."""
    saved = self._mngr.item_metadata(step)["state"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    return self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_config(config: ml_collections.ConfigDict):
  """The cheap checks of a config, run before anything is built or written; returns its mesh.

  The task's own checks (`registry.register(..., check=)`), the compute dtype, the run lengths, the
  mesh against the devices, and the global batch against the mesh's batch shards and the processes.
  Raises ValueError naming the field.
  """
  registry.check(config)
  compute_dtype(config.train.compute_dtype)
  for field in ("num_steps", "global_batch_size"):
    if int(config.train[field]) < 1:
      raise ValueError(f"config.train.{field}={config.train[field]}; expected >= 1")
  for field in ("log_every", "eval_every", "sample_every", "checkpoint_every"):
    if int(config.train[field]) < 0:
      raise ValueError(f"config.train.{field}={config.train[field]}; expected >= 0 (0: off)")
  mesh = sharding.make_mesh(config.mesh)
  sharding.batch_size_per_process(int(config.train.global_batch_size), mesh)
  return mesh


def check_config_compatible(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a config that differs from the workdir's `config.json`, if any, outside
  RUN_CONTROL_FIELDS (a field of FIELDS_ADDED_LATER that the file lacks counts as its old value).
  Reads only."""
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      old = _flatten(json.load(f))
    flat = _flatten(new)
    for k in set(flat) - set(old):
      old.update({k: v for f, v in FIELDS_ADDED_LATER.items() if k == f or k.endswith("." + f)})
    differ = sorted(k for k in set(old) | set(flat)
                    if old.get(k, "<missing>") != flat.get(k, "<missing>")
                    and not any(k == f or k.startswith(f + ".") for f in RUN_CONTROL_FIELDS))
    if differ:
      shown = ", ".join(f"{k} ({old.get(k, '<missing>')!r} -> {flat.get(k, '<missing>')!r})"
                        for k in differ[:6])
      raise ValueError(f"workdir {workdir} was written by an incompatible config; differing fields: "
                       f"{shown}{' ...' if len(differ) > 6 else ''}. Use a new --workdir, or change "
                       f"only {', '.join(RUN_CONTROL_FIELDS)}.")


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes `workdir/config.json` (process 0), creating the workdir."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(json.loads(config.to_json_best_effort()), f, indent=2, sort_keys=True)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (for notebooks and evaluation scripts)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir} is not a run directory: it has no config.json")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def checkpoint_step(ckpt: Checkpointer, step: int | None) -> int:
  """`step` if the workdir has that checkpoint, else its latest when `step` is None; FileNotFoundError
  naming the steps there otherwise."""
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
  if step is None:
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint of step {step} in {ckpt.directory}; saved steps: "
                            f"{', '.join(map(str, sorted(steps)))}")
  return step


def restore_params(workdir: str, *, ema: bool = True, step: int | None = None):
  """(params, config) of a workdir's latest (or given) checkpoint, on one device.

  Reads only `config.json` and the checkpoint: nothing is built (no data, no base run) or trained,
  so it works from any directory and for any task. `params` is the parameter pytree as the task's
  `init_params` made it (EMA parameters unless ema=False); build the network with the method's
  `build_model(config)` (e.g. `core.flow_task`, `relay_jax.task`).
  """
  config = load_config(workdir)
  ckpt = Checkpointer(workdir, create=False)
  try:
    state = ckpt.restore_saved(checkpoint_step(ckpt, step))
  finally:
    ckpt.close()
  return state["ema_params" if ema else "params"], config


def trained_steps(workdir: str) -> int:
  """The latest checkpointed step of a run, 0 when it has none (or does not exist)."""
  workdir = os.path.normpath(workdir)   # "run/../base" must not need "run" to exist
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return 0
  ckpt = Checkpointer(workdir, create=False)
  try:
    return ckpt.latest_step() or 0
  finally:
    ckpt.close()


def ensure_trained(config: ml_collections.ConfigDict, workdir: str, what: str) -> None:
  """Trains (or resumes) the run `workdir` with `config` when it is short of config.train.num_steps,
  saying so: how a method's `prepare` makes the runs it builds on (`what` names the run)."""
  step, want = trained_steps(workdir), int(config.train.num_steps)
  if step < want:
    writers.log(f"{what} run {os.path.normpath(workdir)} is at step {step} of {want}: training it first")
    train(config, workdir)


def restore_trained(workdir: str, num_steps: int, what: str, field: str):
  """(EMA params, config) of a finished run that another one builds on; FileNotFoundError naming the
  config field that points at it when it is missing or unfinished."""
  step = trained_steps(workdir)
  if step < num_steps:
    raise FileNotFoundError(
        f"the {what} run {os.path.normpath(workdir)} ({field}) is at step {step} of {num_steps}; "
        "train it first, e.g. by running this config through `python -m experiments.main`, which "
        "trains it when missing")
  return restore_params(workdir)


# ----------------------------------------------------------------------------------------------
# The loop


class _StopSignals:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the loop checks once per step, so a checkpoint is
  saved before the run exits; a second Ctrl-C aborts at once (KeyboardInterrupt, nothing saved)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None      # the first signal's number
    self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def _handle(self, signum, frame):
    if self.received == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = self.received or signum

  @property
  def name(self) -> str:
    return signal.Signals(self.received).name

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def _check_finite(step: int, metrics: Mapping[str, float], ckpt: Checkpointer) -> None:
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    last = ckpt.latest_step()
    where = (f"last good checkpoint: step {last} in {ckpt.directory}" if last is not None
             else "no checkpoint was saved yet")
    raise NonFiniteError(f"non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; "
                         f"{where}")


def _split_outputs(prefix: str, out: Mapping[str, Any] | None):
  """A hook's outputs -> ({prefix/name: float} scalars, {prefix/name: uint8 image})."""
  scalars, images = {}, {}
  for k, v in (out or {}).items():
    if np.ndim(v) == 3:
      images[f"{prefix}/{k}"] = np.asarray(v)
    else:
      scalars[f"{prefix}/{k}"] = float(v)
  return scalars, images


def run_hooks(task: Task, params: PyTree, step: int, workdir: str, writer: writers.MetricWriter,
              which: tuple[str, ...] = ("eval", "sample"), extra: Mapping[str, float] | None = None):
  """Calls the task's evaluate and/or sample hooks on `params`; writes their scalars (with `extra`)
  as one metrics row and their images to TensorBoard, and prints the scalars. Returns the scalars."""
  row = {}
  for name in which:
    hook = {"eval": task.evaluate, "sample": task.sample}[name]
    if hook is None:
      continue
    scalars, images = _split_outputs(name, hook(params, step, workdir))
    row.update(scalars)
    writer.write_images(step, images)
  if row:
    writer.write(step, {**row, **(extra or {})})
    writers.log(f"step {step} " + writers.format_metrics(row))
  return row


def train(config: ml_collections.ConfigDict, workdir: str) -> int:
  """Trains (or resumes) `config` in `workdir` until `config.train.num_steps`; returns the final step.

  Every `train.log_every` steps (and at the end) one metrics row holds the means of the step metrics
  over the steps since the previous row ("train/loss", ...), the console prints the same means, and
  "train_seconds" (wall-clock spent training, evaluation, sampling and saving excluded, summed over
  resumed runs) goes with every row. Raises ConfigError (nothing written) when the config fails
  `check_config`, differs from the workdir's, or the task refuses it; NonFiniteError when a
  loss/gradient becomes NaN/Inf (nothing after the last good checkpoint is saved). On SIGTERM or
  SIGINT a checkpoint is saved and SystemExit(143 or 130) is raised; a second SIGINT raises
  KeyboardInterrupt at once.
  """
  tc = config.train
  num_steps = int(tc.num_steps)
  try:    # every check before the workdir is touched: a refused start leaves it as it was
    mesh = check_config(config)
    check_config_compatible(workdir, config)
    finished = trained_steps(workdir)
    if finished >= num_steps:     # nothing is built: a finished run needs neither data nor other runs
      writers.log(f"run in {workdir} already finished at step {finished} "
                  f"(train.num_steps={num_steps}); nothing to do")
      return finished
    run = setup(config, mesh, workdir=workdir)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  write_config(workdir, config)
  task = run.task
  ckpt = Checkpointer(workdir, keep=int(tc.keep_checkpoints))
  data = task.train_data(jax.process_index(), jax.process_count())

  start = ckpt.latest_step()
  seconds = 0.0           # training wall-clock before this process's loop (from the checkpoint)
  if start is not None:
    state, data_state, meta = ckpt.restore(start, run.abstract_state, run.shardings)
    data.set_state(data_state)
    seconds = float(meta["train_seconds"])
    writers.log(f"resumed from step {start} in {ckpt.directory}")
  else:
    start = 0
    state = run.init(jax.random.PRNGKey(config.seed))
    writers.log(f"{sum(x.size for x in jax.tree.leaves(state.params)):,} parameters; "
                f"mesh {dict(mesh.shape)}")

  # 0: a fresh start drops everything; the config goes to TensorBoard as text.
  writer = writers.MetricWriter(workdir, resume_step=start, config=config)
  progress = writers.Progress(start, num_steps)
  stop = _StopSignals()
  clock = {"t0": time.perf_counter(), "paused": 0.0}

  def train_seconds():
    return seconds + time.perf_counter() - clock["t0"] - clock["paused"]

  def every(n, step):
    return n and step % n == 0

  def hooks(step, final):
    which = tuple(name for name, n in (("eval", tc.eval_every), ("sample", tc.sample_every))
                  if final or every(n, step))
    if not which:
      return
    jax.block_until_ready(state)          # the clock stops when training's work is done
    t = time.perf_counter()
    run_hooks(task, state.ema_params, step, workdir, writer, which, {"train_seconds": train_seconds()})
    clock["paused"] += time.perf_counter() - t

  pending = None   # metrics of the last dispatched step, checked one step late to keep dispatch async
  sums: dict[str, float] = {}
  count = 0

  def settle():
    nonlocal pending, sums, count
    if pending is None:
      return
    done_step, metrics = pending
    pending = None
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    _check_finite(done_step, metrics, ckpt)
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + v
    count += 1
    means = None
    if every(tc.log_every, done_step) or done_step == num_steps:
      means = {k: v / count for k, v in sums.items()}
      writer.write(done_step, {**{f"train/{k}": v for k, v in means.items()},
                               "train_seconds": train_seconds()})
      sums, count = {}, 0
    progress.update(done_step, means)

  try:
    for step in range(start + 1, num_steps + 1):
      batch = sharding.global_batch(next(data), mesh)
      state, metrics = run.step(state, batch)
      settle()
      pending = (step, metrics)
      if every(tc.checkpoint_every, step) or step == num_steps or stop.received:
        settle()
        t = time.perf_counter()
        ckpt.save(state, data.get_state(), {"train_seconds": train_seconds()})
        # Saving is not training: a resumed run starts from exactly the value saved here, so its clock
        # never runs behind the rows this process still writes after the save.
        clock["paused"] += time.perf_counter() - t
      if stop.received:
        ckpt.wait()
        writers.log(f"{stop.name}: saved checkpoint at step {step} in {ckpt.directory}; exiting")
        raise SystemExit(128 + stop.received)     # 143 for SIGTERM, 130 for SIGINT
      if step < num_steps:
        hooks(step, final=False)
    settle()
    hooks(num_steps, final=True)
  finally:
    stop.restore()
    progress.close()
    writer.close()
    ckpt.wait()
    ckpt.close()
  writers.log(f"finished at step {num_steps} in {train_seconds():.0f} s of training; checkpoints in "
              f"{ckpt.directory}")
  return num_steps


def evaluate_checkpoint(workdir: str, step: int | None = None) -> dict[str, float]:
  """Runs the task's evaluate and sample hooks on the EMA parameters of a run's latest (or given)
  checkpoint, without training: they write their files under the workdir as during training, and
  their scalars are appended to `workdir/evaluations.jsonl` (not metrics.jsonl, which stays the
  training record) and printed. Returns the scalars."""
  config = load_config(workdir)
  try:
    registry.check(config)
  except ValueError as e:
    raise ConfigError(f"{workdir}/config.json: {e}") from e
  ckpt = Checkpointer(workdir, create=False)
  try:
    step = checkpoint_step(ckpt, step)
  finally:
    ckpt.close()
  params, _ = restore_params(workdir, step=step)
  task = build_task(config, workdir)
  writer = writers.MetricWriter(workdir, filename="evaluations.jsonl", tensorboard="tensorboard_eval")
  try:
    return run_hooks(task, params, step, workdir, writer)
  finally:
    writer.close()
