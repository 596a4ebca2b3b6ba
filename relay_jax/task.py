"""Relay's trainer tasks: `relay_sudoku` (81-cell puzzles) and `relay_code` (block diffusion over the
Python standard library's bytes). `config.relay.objective` picks mlm | rollout | relay | relay_sg.

Sudoku tokens: 0 = MASK (a blank), 1-9 digits; the clues are never masked. Code tokens: bytes 0-255,
MASK = 256; every position is maskable.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from core import data, registry, train
from relay_jax import block, objectives, sample, sudoku, unmask
from relay_jax import code_data, sudoku_data
from relay_jax.model import RELAY_POSITIONS, RelayTransformer

SUDOKU_MASK, SUDOKU_VOCAB = 0, 10


def check_objective(config: ml_collections.ConfigDict) -> str:
  registry.check_choices(config, {"relay.objective": objectives.OBJECTIVES})
  return config.relay.objective


def uses_relay(config: ml_collections.ConfigDict) -> bool:
  return check_objective(config) in ("relay", "relay_sg")


def build_model(config: ml_collections.ConfigDict, vocab_size: int, mask_id: int) -> RelayTransformer:
  m, r = config.model, config.relay
  return RelayTransformer(
      vocab_size=vocab_size, mask_id=mask_id, width=m.width, depth=m.depth, num_heads=m.num_heads,
      mlp_dim=m.mlp_dim, dropout=m.dropout, tie_embeddings=m.tie_embeddings, relay=uses_relay(config),
      relay_positions=r.positions, relay_zero_init=r.zero_init, relay_layer=r.layer,
      attn_impl=m.attention)


def plain_apply(model: RelayTransformer) -> objectives.Apply:
  """`objectives.Apply` for a model that needs no clean context (Sudoku)."""
  def apply(params, x, h, key, clean):
    rngs = None if key is None else {"dropout": key}
    return model.apply({"params": params}, x, h, deterministic=key is None, rngs=rngs)
  return apply


def make_loss(config, apply, vocab_mask_id: int, length: int, select=None, block_size=None):
  """The task's loss (and carry initialiser) for config.relay.objective."""
  objective, r = check_objective(config), config.relay
  if objective == "mlm":
    def loss(params, batch, key, carry):
      value, metrics = objectives.mlm_loss(apply, params, batch["x0"], batch["maskable"],
                                           vocab_mask_id, key, block_size=block_size)
      return value, metrics, carry
    return loss, None

  def loss(params, batch, key, buffer):
    return objectives.rollout_loss(apply, params, buffer, batch["x0"], batch["maskable"],
                                   objective=objective, mask_id=vocab_mask_id, rounds=int(r.rounds),
                                   tau=float(r.train_tau), tau_std=float(r.train_tau_std), key=key,
                                   select=select)
  init = lambda key: objectives.init_buffer(int(config.train.global_batch_size), length,
                                            int(config.model.width))
  return loss, init


# --- Sudoku --------------------------------------------------------------------------------------

def sudoku_batch(example: dict) -> dict:
  return {"x0": example["solution"].astype(np.int32), "maskable": example["puzzle"] == 0}


def make_solver(config: ml_collections.ConfigDict, model: RelayTransformer | None = None):
  """Jitted (params, puzzles int [N, 81], tau) -> (grids [N, 81], nfe [N]), in chunks of
  config.relay.eval_batch puzzles."""
  model = model or build_model(config, SUDOKU_VOCAB, SUDOKU_MASK)
  loop = jax.jit(functools.partial(
      sample.unmask_loop, plain_apply(model), mask_id=SUDOKU_MASK, width=int(config.model.width),
      max_rounds=int(config.relay.max_rounds), use_relay=uses_relay(config)))
  chunk = int(config.relay.eval_batch)

  def solve(params, puzzles_Nx81, tau):
    puzzles_Nx81 = np.asarray(puzzles_Nx81, np.int32)
    n = len(puzzles_Nx81)
    padded = np.concatenate([puzzles_Nx81, np.repeat(puzzles_Nx81[:1], -n % chunk, 0)])
    outs = [loop(params, jnp.asarray(padded[i:i + chunk]), tau=jnp.float32(tau))
            for i in range(0, len(padded), chunk)]
    grids, nfe = (np.concatenate([np.asarray(o[j]) for o in outs])[:n] for j in (0, 1))
    return grids, nfe
  return solve


def sudoku_metrics(grids_Nx81, solutions_Nx81, nfe_N) -> dict[str, float]:
  """Exact match, cell accuracy (over all 81 cells), valid-grid fraction, mean NFE."""
  grids, solutions = np.asarray(grids_Nx81), np.asarray(solutions_Nx81)
  return {"exact_match": float((grids == solutions).all(1).mean()),
          "cell_accuracy": float((grids == solutions).mean()),
          "valid": float(sudoku.valid_solutions(grids).mean()),
          "nfe": float(np.mean(nfe_N))}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Both Relay tasks' fields with a fixed set of values (before anything is built)."""
  check_objective(config)
  registry.check_choices(config, {"relay.positions": RELAY_POSITIONS})


def check_sudoku_config(config: ml_collections.ConfigDict) -> None:
  check_config(config)
  registry.check_choices(config, {"data.config": tuple(data.config_names("sudoku"))})


@registry.register("relay_sudoku", check=check_sudoku_config)
def build_sudoku(config: ml_collections.ConfigDict, workdir: str | None = None) -> train.Task:
  del workdir     # needs no other run
  model = build_model(config, SUDOKU_VOCAB, SUDOKU_MASK)
  loss, init_carry = make_loss(config, plain_apply(model), SUDOKU_MASK, 81)

  def train_data(process_index, process_count):
    source = data.load_in_memory("sudoku", "train", config=config.data.config)
    return data.BatchIterator(
        source, global_batch_size=int(config.train.global_batch_size), seed=config.seed,
        process_index=process_index, process_count=process_count,
        transform=lambda ex, rng: sudoku_batch(sudoku_data.random_symmetry(ex, rng)))

  test = data.load_in_memory("sudoku", "test", config=config.data.config).arrays
  size = int(config.relay.eval_size)
  solver = make_solver(config, model)

  def evaluate(params, step, workdir):
    grids, nfe = solver(params, test["puzzle"][:size], float(config.relay.eval_tau))
    return sudoku_metrics(grids, test["solution"][:size], nfe)

  return train.Task(
      init_params=lambda key: model.init(key, jnp.zeros((1, 81), jnp.int32))["params"],
      loss=loss, train_data=train_data, evaluate=evaluate, init_carry=init_carry)


# --- code (block diffusion) ----------------------------------------------------------------------

def code_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(num_blocks, block_size)."""
  seq_len, block_size = int(config.data.seq_len), int(config.relay.block_size)
  if seq_len % block_size:
    raise ValueError(f"config.data.seq_len={seq_len} is not a multiple of "
                     f"config.relay.block_size={block_size}")
  return seq_len // block_size, block_size


def code_token_accuracy(config, model, params, tokens_NxL, tau) -> dict[str, float]:
  """Held-out token accuracy and block exact match (all of a block's tokens right) of blocks 1..
  given the true earlier blocks (block 0 is the prompt), and the mean denoising rounds (NFE) per
  generated block."""
  num_blocks, block_size = code_shape(config)
  tokens = np.asarray(tokens_NxL, np.int32)
  chunk = min(int(config.relay.eval_batch), len(tokens))
  run = jax.jit(lambda p, ctx, tau: block.sample_blocks(
      model, p, chunk, num_blocks, block_size, tau=tau, use_relay=uses_relay(config),
      reset_relay=bool(config.relay.reset_per_block), context_BxL=ctx, prompt_blocks=1,
      teacher_forced=True))
  n = len(tokens) // chunk * chunk
  correct, nfe = [], []
  for i in range(0, n, chunk):
    out, f = run(params, jnp.asarray(tokens[i:i + chunk]), jnp.float32(tau))
    correct.append((np.asarray(out) == tokens[i:i + chunk])[:, block_size:])
    nfe.append(np.asarray(f))
  correct = np.concatenate(correct)
  blocks = correct.reshape(len(correct), num_blocks - 1, block_size)
  return {"token_accuracy": float(correct.mean()), "block_exact_match": float(blocks.all(-1).mean()),
          "nfe_per_block": float(np.mean(nfe) / (num_blocks - 1))}


def check_code_config(config: ml_collections.ConfigDict) -> None:
  check_config(config)
  code_shape(config)


@registry.register("relay_code", check=check_code_config)
def build_code(config: ml_collections.ConfigDict, workdir: str | None = None) -> train.Task:
  del workdir     # needs no other run
  num_blocks, block_size = code_shape(config)
  vocab, mask_id = code_data.VOCAB_SIZE + 1, code_data.MASK_ID
  model = build_model(config, vocab, mask_id)
  select = functools.partial(unmask.select_threshold, block_size=block_size)
  loss, init_carry = make_loss(config, block.make_train_apply(model, num_blocks, block_size),
                               mask_id, num_blocks * block_size, select=select,
                               block_size=block_size)

  def to_batch(example, rng):
    x0 = example["tokens"].astype(np.int32)
    return {"x0": x0, "maskable": np.ones(x0.shape, bool)}

  def train_data(process_index, process_count):
    source = data.load_in_memory("stdlib_bytes", "train", config=f"l{config.data.seq_len}")
    return data.BatchIterator(
        source, global_batch_size=int(config.train.global_batch_size), seed=config.seed,
        process_index=process_index, process_count=process_count, transform=to_batch)

  test = data.load_in_memory("stdlib_bytes", "test", config=f"l{config.data.seq_len}").arrays
  size = int(config.relay.eval_size)

  def evaluate(params, step, workdir):
    return code_token_accuracy(config, model, params, test["tokens"][:size],
                               float(config.relay.eval_tau))

  init = lambda key: model.init(key, jnp.zeros((1, 2 * num_blocks * block_size), jnp.int32))["params"]
  return train.Task(init_params=init, loss=loss, train_data=train_data, evaluate=evaluate,
                    init_carry=init_carry)
