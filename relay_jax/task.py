"""Relay's trainer tasks: `relay_sudoku` (n x n puzzles, n from the data config) and `relay_code`
(block diffusion over the Python standard library's bytes). `config.relay.objective` picks mlm |
rollout | relay | relay_sg.

Sudoku tokens: 0 = MASK (a blank), 1-n digits; the clues are never masked. Code tokens: bytes 0-255,
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

SUDOKU_MASK = 0


def sudoku_size(config: ml_collections.ConfigDict) -> int:
  """n of the run's n x n puzzles (from its `sudoku` data config)."""
  return sudoku_data.grid_size(config.data.config)


def sudoku_model(config: ml_collections.ConfigDict) -> RelayTransformer:
  """The Sudoku denoiser: tokens MASK (= blank) and the digits 1..n."""
  return build_model(config, sudoku_size(config) + 1, SUDOKU_MASK)


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
                                           vocab_mask_id, key, block_size=block_size,
                                           weighting=r.mlm_weighting)
      return value, metrics, carry
    return loss, None

  def loss(params, batch, key, buffer):
    return objectives.rollout_loss(apply, params, buffer, batch["x0"], batch["maskable"],
                                   objective=objective, mask_id=vocab_mask_id, rounds=int(r.rounds),
                                   tau=float(r.train_tau), tau_std=float(r.train_tau_std), key=key,
                                   select=select, tau_jitter=r.tau_jitter)
  init = lambda key: objectives.init_buffer(int(config.train.global_batch_size), length,
                                            int(config.model.width))
  return loss, init


# --- Sudoku --------------------------------------------------------------------------------------

def sudoku_batch(example: dict) -> dict:
  return {"x0": example["solution"].astype(np.int32), "maskable": example["puzzle"] == 0}


def make_solver(config: ml_collections.ConfigDict, model: RelayTransformer | None = None):
  """Jitted (params, puzzles int [N, n*n], tau) -> (grids [N, n*n], nfe [N]), in chunks of
  config.relay.eval_batch puzzles."""
  model = model or sudoku_model(config)
  loop = jax.jit(functools.partial(
      sample.unmask_loop, plain_apply(model), mask_id=SUDOKU_MASK, width=int(config.model.width),
      max_rounds=int(config.relay.max_rounds), use_relay=uses_relay(config)))
  chunk = int(config.relay.eval_batch)

  def solve(params, puzzles_NxC, tau):
    puzzles_NxC = np.asarray(puzzles_NxC, np.int32)
    n = len(puzzles_NxC)
    padded = np.concatenate([puzzles_NxC, np.repeat(puzzles_NxC[:1], -n % chunk, 0)])
    outs = [loop(params, jnp.asarray(padded[i:i + chunk]), tau=jnp.float32(tau))
            for i in range(0, len(padded), chunk)]
    grids, nfe = (np.concatenate([np.asarray(o[j]) for o in outs])[:n] for j in (0, 1))
    return grids, nfe
  return solve


def authors_nfe(nfe_N, batch_size: int) -> np.ndarray:
  """The authors' NFE per puzzle, [N] from each puzzle's own rounds nfe_N [N]: their solver runs
  every puzzle of an evaluation batch (consecutive chunks of `batch_size`, the last one partial)
  until the batch's slowest is done, plus one final pass, so each puzzle counts its batch's
  max(rounds) + 1. The mean over puzzles is the mean over batches weighted by batch size."""
  nfe_N = np.asarray(nfe_N)
  out_N = np.empty(nfe_N.shape, np.int64)
  for i in range(0, len(nfe_N), batch_size):
    out_N[i:i + batch_size] = nfe_N[i:i + batch_size].max() + 1
  return out_N


def sudoku_metrics(grids_NxC, solutions_NxC, nfe_N, puzzles=None,
                   batch_size: int | None = None) -> dict[str, float]:
  """Exact match, cell accuracy (over all C cells), valid-grid fraction, mean NFE (each puzzle's own
  rounds); with the puzzles [N, C], "blank_accuracy" over the cells blank in the puzzle (the
  authors' cell accuracy: the clues are copied, so counting them hides a near-chance solver); with
  the evaluation batch size, "nfe_authors" (`authors_nfe`)."""
  grids, solutions = np.asarray(grids_NxC), np.asarray(solutions_NxC)
  right = grids == solutions
  out = {"exact_match": float(right.all(1).mean()), "cell_accuracy": float(right.mean()),
         "valid": float(sudoku.valid_solutions(grids).mean()), "nfe": float(np.mean(nfe_N))}
  if puzzles is not None:
    blank = np.asarray(puzzles) == SUDOKU_MASK
    out["blank_accuracy"] = float((right & blank).sum() / max(blank.sum(), 1))
  if batch_size is not None:
    out["nfe_authors"] = float(authors_nfe(nfe_N, batch_size).mean())
  return out


def check_config(config: ml_collections.ConfigDict) -> None:
  """Both Relay tasks' fields with a fixed set of values (before anything is built)."""
  check_objective(config)
  registry.check_choices(config, {"relay.positions": RELAY_POSITIONS,
                                  "relay.mlm_weighting": objectives.MLM_WEIGHTINGS,
                                  "relay.tau_jitter": objectives.TAU_JITTERS})


def check_sudoku_config(config: ml_collections.ConfigDict) -> None:
  check_config(config)
  registry.check_choices(config, {"data.config": tuple(data.config_names("sudoku"))})


@registry.register("relay_sudoku", check=check_sudoku_config)
def build_sudoku(config: ml_collections.ConfigDict, workdir: str | None = None) -> train.Task:
  del workdir     # needs no other run
  model = sudoku_model(config)
  cells = sudoku_size(config) ** 2
  loss, init_carry = make_loss(config, plain_apply(model), SUDOKU_MASK, cells)

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
    puzzles = test["puzzle"][:size]
    grids, nfe = solver(params, puzzles, float(config.relay.eval_tau))
    return sudoku_metrics(grids, test["solution"][:size], nfe, puzzles,
                          batch_size=int(config.relay.eval_batch))

  return train.Task(
      init_params=lambda key: model.init(key, jnp.zeros((1, cells), jnp.int32))["params"],
      loss=loss, train_data=train_data, evaluate=evaluate, init_carry=init_carry)


# --- code (block diffusion) ----------------------------------------------------------------------

def code_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(num_blocks, block_size)."""
  seq_len, block_size = int(config.data.seq_len), int(config.relay.block_size)
  if seq_len % block_size:
    raise ValueError(f"config.data.seq_len={seq_len} is not a multiple of "
                     f"config.relay.block_size={block_size}")
  return seq_len // block_size, block_size


def code_token_accuracy(config, model, params, tokens_NxL, tau, per_sequence: bool = False) -> dict:
  """Held-out token accuracy and block exact match (all of a block's tokens right) of blocks 1..
  given the true earlier blocks (block 0 is the prompt), and the mean denoising rounds (NFE) per
  generated block; with per_sequence, also per evaluated sequence [n] (a whole number of
  eval_batch chunks): "exact_blocks_n" (blocks exactly right), "nfe_n" (rounds over its blocks)."""
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
  out = {"token_accuracy": float(correct.mean()), "block_exact_match": float(blocks.all(-1).mean()),
         "nfe_per_block": float(np.mean(nfe) / (num_blocks - 1))}
  if per_sequence:
    out.update(exact_blocks_n=blocks.all(-1).sum(-1), nfe_n=np.concatenate(nfe))
  return out


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
