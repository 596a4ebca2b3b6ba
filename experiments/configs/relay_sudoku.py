"""Relay (arXiv 2605.22967) on Sudoku: a masked-diffusion transformer over the 81 cells.

Preset `smoke | cpu | paper`; the objective is a field:
  python -m experiments.main --config experiments/configs/relay_sudoku.py:cpu \\
      --config.relay.objective=relay --workdir runs/sudoku_relay
Objectives: mlm (MDLM), rollout (the buffer without the relay channel), relay_sg, relay.
"""
import ml_collections

from experiments.configs import _base


def get_config(preset: str = "cpu"):
  c = _base.base(preset)
  c.task = "relay_sudoku"
  # Generated minimal puzzles (relay_jax.sudoku_data): 100000 train / 2000 test; the paper trains on
  # Sudoku-Extreme's 3.8M, which cannot be downloaded here.
  c.data.config = "large"
  # The paper's model: d=384, 4 layers, 6 heads, FFN 1536, ReLU, dropout 0.1, tied embeddings.
  c.model.update({"width": 384, "depth": 4, "num_heads": 6, "mlp_dim": 1536, "dropout": 0.1,
                  "tie_embeddings": True, "attention": "xla"})
  c.relay = ml_collections.ConfigDict({
      "objective": "relay",
      "positions": "all",       # the Sudoku variant adds LayerNorm(h) everywhere, default init
      "zero_init": False,
      "layer": -1,              # relay the last block's output
      "rounds": 2,              # K, the truncated-BPTT window
      "train_tau": 0.15, "train_tau_std": 0.1,
      "eval_tau": 0.15, "max_rounds": 64,
      "eval_size": 1000, "eval_batch": 250,
  })
  # The paper: batch 512, lr 5e-4, 2k warm-up, clip 0.5, 300k steps, EMA weights for evaluation.
  c.train.update({"num_steps": 300000, "global_batch_size": 512, "log_every": 500,
                  "eval_every": 10000, "checkpoint_every": 5000})
  c.optim.update({"lr": 5e-4, "warmup_steps": 2000, "grad_clip_norm": 0.5, "ema_decay": 0.9999,
                  "schedule": "constant"})
  if preset == "cpu":
    c.data.config = "graded"   # minimal puzzles with 0-30 clues given back: minimal to easy
    # 0.16 s per relay step (2 rounds) measured on the 2-core machine: 4 objectives in ~6 minutes.
    c.model.update({"width": 64, "depth": 2, "num_heads": 4, "mlp_dim": 256, "dropout": 0.0})
    c.train.update({"num_steps": 600, "global_batch_size": 32, "log_every": 100,
                    "eval_every": 0, "checkpoint_every": 400})
    c.optim.update({"lr": 2e-3, "warmup_steps": 50, "ema_decay": 0.98})
    c.relay.update({"eval_size": 250, "eval_batch": 250})
  elif preset == "smoke":
    c.data.config = "tiny"
    c.model.update({"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64})
    c.train.update({"num_steps": 4, "global_batch_size": 16, "log_every": 2, "eval_every": 2,
                    "checkpoint_every": 2})
    c.optim.update({"warmup_steps": 1, "ema_decay": 0.0})
    c.relay.update({"eval_size": 32, "eval_batch": 32, "max_rounds": 8})
  return c
