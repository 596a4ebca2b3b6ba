"""GRPO fine-tuning of a pretrained flow model through the common trainer (registered as "flow_grpo").

The base model is the `flow_matching` run in `config.grpo.base_workdir` (an absolute path, or one
relative to the GRPO run's workdir), trained with the config `config.base`
(experiments/configs/flow_2d.py or flow_images.py). Its EMA parameters start the policy and are the KL
reference. Building the task never trains: `prepare_base` (the task's registered `prepare`, which the
CLI and the table scripts call) trains or resumes the base run first when it is missing or unfinished.

Every grpo.updates_per_batch train steps, sample train.global_batch_size conditions x updates_per_batch
x grpo.group_size trajectories with the current policy (gradient stopped), reward the final samples and
form group advantages; this buffer lives in the trainer's carry (checkpointed with the state), and each
of the next updates_per_batch steps takes the GRPO loss (flowrl.grpo.policy_loss) on its share of the
groups, at a random subset of the stochastic steps. The carry also counts iterations (the sliding SDE
window moves once per sampled batch). `evaluate` reports the mean reward on fixed noises and conditions with the
training sampler ("reward_sde"), the ODE at grpo.num_steps NFE ("reward_ode") and the ODE at
grpo.eval_long_nfe NFE ("reward_ode_long"); the trainer
adds the wall-clock seconds spent training so far ("train_seconds", evaluation excluded) to each row,
so metrics.jsonl gives reward against iteration and against time.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from core import data, flow, flow_task, registry, train
from core.nn import lora
from flowrl import grpo, rewards, samplers

EVAL_KEY = 1234


def base_workdir(config: ml_collections.ConfigDict, workdir: str | None) -> str:
  """config.grpo.base_workdir, resolved against the GRPO run's `workdir` when relative (against the
  current directory when there is no workdir)."""
  return os.path.normpath(os.path.join(workdir or os.curdir,
                                       os.path.expanduser(config.grpo.base_workdir)))


def prepare_base(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains (or resumes) the base run with config.base when it is missing or unfinished, saying so."""
  train.ensure_trained(config.base, base_workdir(config, workdir), "base")


def base_model(config: ml_collections.ConfigDict, workdir: str | None):
  """(model, EMA params, base config) of the finished base run; FileNotFoundError when it is missing
  or unfinished (`prepare_base` trains it)."""
  params, base_config = train.restore_trained(
      base_workdir(config, workdir), int(config.base.train.num_steps), "base",
      f"config.grpo.base_workdir={config.grpo.base_workdir!r}, relative to the GRPO workdir")
  return flow_task.build_model(base_config), params, base_config


def num_train_steps(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(window length, K): the SDE window's steps and how many of them each iteration trains on."""
  gc = config.grpo
  eligible = int(gc.num_steps) - 1          # the step to t = 0 stays deterministic (samplers.window_mask)
  length = int(gc.window_size) or eligible
  if not 1 <= length <= eligible:
    raise ValueError(f"config.grpo.window_size={gc.window_size} must be 0 (all) or in [1, {eligible}]")
  return length, max(1, round(float(gc.timestep_fraction) * length))


RECIPES = ("matched", "published")


def effective_clip_range(config: ml_collections.ConfigDict, shape: tuple[int, ...]) -> float:
  """PPO's clip range for samples of `shape`: grpo.clip_range * sqrt(grpo.clip_ref_dim / D), D the
  sample's size (grpo.clip_range as given when clip_ref_dim is 0).

  The clipped log-ratio is a mean over the D dimensions, whose spread across samples falls as
  1 / sqrt(D) for the same per-dimension policy change; the scaling keeps the clip as tight relative
  to that spread as the published value was on the published model's D (experiments/configs/_precise.py).
  """
  gc = config.grpo
  ref, dim = int(gc.clip_ref_dim), int(np.prod(shape))
  return float(gc.clip_range) * (float(np.sqrt(ref / dim)) if ref else 1.0)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The GRPO fields (and the base run's) with a fixed set or range of values, before anything is
  built or trained."""
  sde_methods = tuple(m for m in samplers.METHODS if m != "ode")
  registry.check_choices(config, {"grpo.sampler": sde_methods, "grpo.window_kind": grpo.WINDOW_KINDS,
                                  "grpo.reward": rewards.REWARDS, "grpo.recipe": RECIPES})
  num_train_steps(config)
  if config.grpo.sde_last_step and config.grpo.sampler in samplers.DETERMINISTIC_AT_ZERO:
    raise ValueError(f"config.grpo.sde_last_step=True, but the step to t = 0 is deterministic for "
                     f"config.grpo.sampler={config.grpo.sampler!r}; expected False")
  updates = int(config.grpo.updates_per_batch)
  if updates < 1:
    raise ValueError(f"config.grpo.updates_per_batch={config.grpo.updates_per_batch}; expected >= 1")
  if int(config.train.log_every) % updates:
    raise ValueError(f"config.train.log_every={config.train.log_every} must be a multiple of "
                     f"config.grpo.updates_per_batch={updates} (each logged row then averages every "
                     "update index equally: the per-update clip metrics need it)")
  if int(config.grpo.clip_ref_dim) < 0 or float(config.grpo.clip_range) <= 0:
    raise ValueError(f"config.grpo.clip_range={config.grpo.clip_range} must be > 0 and "
                     f"config.grpo.clip_ref_dim={config.grpo.clip_ref_dim} >= 0")
  if int(config.grpo.eval_long_nfe) < 1:
    raise ValueError(f"config.grpo.eval_long_nfe={config.grpo.eval_long_nfe}; expected >= 1")
  flow_task.check_config(config.base)


@registry.register("flow_grpo", check=check_config, prepare=prepare_base)
def build(config: ml_collections.ConfigDict, workdir: str | None = None) -> train.Task:
  check_config(config)          # also when built without the trainer (setup, evaluation)
  gc = config.grpo
  model, base_params, base_config = base_model(config, workdir)
  shape = flow_task.example_shape(base_config)
  num_classes = int(base_config.model.num_classes)
  reward_fn = rewards.get(gc.reward)
  grid = flow.time_grid(int(gc.num_steps), shift=float(gc.shift))
  num_steps, group = int(gc.num_steps), int(gc.group_size)
  window, k_train = num_train_steps(config)
  clip_range = effective_clip_range(config, shape)
  lora_rank, lora_scale = int(gc.lora_rank), float(gc.lora_alpha) / max(int(gc.lora_rank), 1)

  def apply_fn(params):
    """(x, t, y) -> v of the policy `params` (base + LoRA factors, or all parameters)."""
    if lora_rank:
      return lambda x, t, y: lora.apply_with_lora(model, params["base"], params["lora"], x, t, y,
                                                  scale=lora_scale)
    return lambda x, t, y: model.apply({"params": params}, x, t, y)

  def velocity(fn, y_B):
    """(x, t) -> v of fn for conditions y_B [B], with CFG when configured."""
    if not num_classes:
      return samplers.guided_velocity(fn, None)
    return samplers.guided_velocity(fn, y_B, jnp.full_like(y_B, num_classes), float(gc.cfg_scale))

  reference = lambda x, t, y: model.apply({"params": base_params}, x, t, y)

  def init_params(key):
    if not lora_rank:
      return base_params
    return {"base": base_params, "lora": lora.init_lora(base_params, list(gc.lora_patterns), lora_rank,
                                                        key)}

  def trainable(params):
    return {"base": jax.tree.map(lambda _: False, params["base"]),
            "lora": jax.tree.map(lambda _: True, params["lora"])}

  def sde_mask(iteration, key):
    if not int(gc.window_size):
      return samplers.window_mask(num_steps)
    start = grpo.window_start(iteration, key, num_positions=num_steps - window, kind=gc.window_kind,
                              every=int(gc.window_every))
    return samplers.window_mask(num_steps, (start, start + window))

  updates = int(gc.updates_per_batch)      # >= 1 (check_config)

  def sample_batch(params, y_N, key, iteration):
    """Samples y_N.size // group groups with the (gradient-stopped) policy and their advantages:
    the buffer of the next `updates` steps, every array led by the trajectory axis N."""
    noise_key, window_key, sample_key = jax.random.split(key, 3)
    x_T = grpo.group_noise(noise_key, y_N.shape[0] // group, group, shape, same_noise=gc.same_noise)
    old_policy = velocity(apply_fn(jax.lax.stop_gradient(params)), y_N)
    traj = samplers.sample(old_policy, x_T, grid, sample_key, method=gc.sampler, eta=float(gc.eta),
                           sde_window=sde_mask(iteration // updates, window_key),
                           sde_last_step=bool(gc.sde_last_step))
    reward_N = reward_fn(traj.x0, y_N)
    adv_N = grpo.group_advantages(reward_N.reshape(-1, group), global_std=gc.global_std,
                                  eps=float(gc.adv_eps), clip=float(gc.adv_clip)).reshape(-1)
    time_major = {"xs": traj.xs, "means": traj.means, "stds": traj.stds, "log_probs": traj.log_probs}
    return {**{k: jnp.moveaxis(v, 0, 1) for k, v in time_major.items()}, "y": y_N, "adv": adv_N,
            "reward": reward_N, "sde_mask": jnp.broadcast_to(traj.sde_mask, (y_N.shape[0], num_steps))}

  def loss(params, batch, key, carry):
    """One update on 1/updates of the buffer; a new buffer is sampled every `updates` steps from
    this step's conditions (Flow-GRPO's split of a sampled batch into several updates: the first is
    on-policy, the later ones off-policy, which is where the clip range acts)."""
    it = carry["iteration"]
    sample_key, steps_key = jax.random.split(key)
    n_conditions = batch["y"].shape[0]
    y_N = jnp.repeat(batch["y"], updates * group)
    # Buffer arrays are [conditions, updates * group, ...] so that the carry is batch-major.
    as_carry = lambda a: a.reshape(n_conditions, updates * group, *a.shape[1:])
    buffer = jax.lax.cond(
        it % updates == 0,
        lambda: jax.tree.map(as_carry, sample_batch(params, y_N, sample_key, it)),
        lambda: carry["buffer"])
    # This update's share: `group` trajectories of every condition, i.e. whole groups.
    part = it % updates
    mine = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, part * group, group, axis=1)
                        .reshape(n_conditions * group, *a.shape[2:]), buffer)
    traj = samplers.Trajectory(
        xs=jnp.moveaxis(mine["xs"], 1, 0), means=jnp.moveaxis(mine["means"], 1, 0),
        stds=jnp.moveaxis(mine["stds"], 1, 0), log_probs=jnp.moveaxis(mine["log_probs"], 1, 0),
        sde_mask=mine["sde_mask"][0], times=grid, x0=mine["xs"][:, -1])
    ref = velocity(reference, mine["y"]) if float(gc.beta) > 0 else None
    steps_K = grpo.choose_steps(steps_key, samplers.trainable_steps(traj.sde_mask), k_train)
    value, metrics = grpo.policy_loss(
        velocity(apply_fn(params), mine["y"]), traj, mine["adv"], steps_K, method=gc.sampler,
        eta=float(gc.eta), clip_range=clip_range, beta=float(gc.beta), ref_velocity_fn=ref,
        use_ratio_norm=gc.ratio_norm)
    # Per update index u (1 = on-policy): the clip metrics times updates * [part == u - 1], so the
    # logged means (over a multiple of `updates` steps, check_config) are those of update u alone.
    per_update = {f"{name}_u{u + 1}": metrics[name] * updates * (part == u)
                  for name in ("clip_frac", "grad_frac") for u in range(updates)}
    return value, {**metrics, **per_update, "reward": mine["reward"].mean()}, {"iteration": it + 1,
                                                                                "buffer": buffer}

  def init_carry(key):
    n = int(config.train.global_batch_size)
    y_N = jnp.zeros((n * updates * group,), jnp.int32)
    abstract = jax.eval_shape(lambda: sample_batch(init_params(key), y_N, key, jnp.int32(0)))
    return {"iteration": jnp.zeros((), jnp.int32),
            "buffer": jax.tree.map(lambda a: jnp.zeros((n, updates * group, *a.shape[1:]), a.dtype),
                                   abstract)}

  def train_data(process_index, process_count):
    # Each epoch visits every class train.global_batch_size times (one group per drawn label).
    labels = np.arange(int(config.train.global_batch_size) * max(num_classes, 1)) % max(num_classes, 1)
    return data.BatchIterator(data.InMemorySource(arrays={"y": labels.astype(np.int32)}),
                              global_batch_size=int(config.train.global_batch_size), seed=config.seed,
                              process_index=process_index, process_count=process_count)

  evaluate_rewards = make_evaluator(config, lambda p, y: velocity(apply_fn(p), y), shape, num_classes,
                                    reward_fn, grid)

  def evaluate(params, step, workdir):
    return evaluate_rewards(params)

  return train.Task(init_params=init_params, loss=loss, train_data=train_data, evaluate=evaluate,
                    trainable=trainable if lora_rank else None,
                    init_carry=init_carry)


def make_evaluator(config, policy, shape, num_classes, reward_fn, grid):
  """params -> {"reward_sde", "reward_ode", "reward_ode_long"}: mean rewards of grpo.eval_size samples
  from fixed noises (and conditions 0, 1, ..., num_classes - 1, 0, ...) by the training sampler at its
  training noise (Precise's trainer evaluation), by Euler on `grid` (grpo.num_steps NFE) and by Euler
  at grpo.eval_long_nfe NFE with the same shift (Flow-GRPO's and FlowCPS's 40-NFE evaluation).

  policy: (params, y [n]) -> (x, t) -> v.
  """
  gc = config.grpo
  n = int(gc.eval_size)
  noise_key, sde_key = jax.random.split(jax.random.PRNGKey(EVAL_KEY))
  x_T = jax.random.normal(noise_key, (n, *shape))
  y = jnp.arange(n, dtype=jnp.int32) % max(num_classes, 1)
  long_grid = flow.time_grid(int(gc.eval_long_nfe), shift=float(gc.shift))

  @jax.jit
  def run(params):
    fn = policy(params, y)
    ode = flow.euler_sample(fn, x_T, grid)
    ode_long = flow.euler_sample(fn, x_T, long_grid)
    sde = samplers.sample(fn, x_T, grid, sde_key, method=gc.sampler, eta=float(gc.eta),
                          sde_last_step=bool(gc.sde_last_step)).x0
    return {"reward_sde": reward_fn(sde, y).mean(), "reward_ode": reward_fn(ode, y).mean(),
            "reward_ode_long": reward_fn(ode_long, y).mean()}

  def evaluate_rewards(params):
    return {k: float(v) for k, v in run(params).items()}

  return evaluate_rewards
