"""Relay's LLM variant at our scale: block diffusion (BD3-LM) over bytes of the Python standard
library (relay_jax.code_data), with or without the relay channel.

  python -m experiments.main --config experiments/configs/relay_code.py:cpu \\
      --config.relay.objective=relay --workdir runs/code_relay
"""
import ml_collections

from experiments.configs import _base


def get_config(preset: str = "cpu"):
  c = _base.base(preset)
  c.task = "relay_code"
  c.data.seq_len = 128
  c.model.update({"width": 384, "depth": 6, "num_heads": 6, "mlp_dim": 1536, "dropout": 0.1,
                  "tie_embeddings": True, "attention": "xla"})
  c.relay = ml_collections.ConfigDict({
      "objective": "relay",
      "block_size": 16,
      "positions": "masked",    # the LLM variant: only at masked positions, scale starts at 0
      "zero_init": True,
      "layer": -1,
      "reset_per_block": True,
      "rounds": 2,
      "train_tau": 0.85, "train_tau_std": 0.05,   # the threshold rule's confidence bar
      "tau_jitter": "batch",    # one jittered tau a round for the whole batch (authors'), or "row"
      "mlm_weighting": "unweighted",   # the mlm baseline's loss: the authors' plain mean, or "mdlm"
      "eval_tau": 0.85, "max_rounds": 16,
      "eval_size": 512, "eval_batch": 128,
  })
  c.train.update({"num_steps": 100000, "global_batch_size": 256, "log_every": 500,
                  "eval_every": 5000, "checkpoint_every": 5000})
  c.optim.update({"lr": 3e-4, "warmup_steps": 2000, "grad_clip_norm": 1.0, "ema_decay": 0.9999,
                  "ema_warmup": True})
  if preset == "cpu":
    c.data.seq_len = 64
    c.relay.block_size = 8
    # 0.26 s per relay step (2 rounds over [x_t ; x0], 128 tokens) on the 2-core machine.
    c.model.update({"width": 96, "depth": 2, "num_heads": 4, "mlp_dim": 384, "dropout": 0.0})
    c.train.update({"num_steps": 1000, "global_batch_size": 16, "log_every": 100, "eval_every": 0,
                    "checkpoint_every": 250})
    c.optim.update({"lr": 2e-3, "warmup_steps": 50, "ema_decay": 0.98})
    c.relay.update({"eval_size": 256, "eval_batch": 128, "max_rounds": 8})
  elif preset == "smoke":
    c.data.seq_len = 64
    c.relay.block_size = 16
    c.model.update({"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64})
    c.train.update({"num_steps": 4, "global_batch_size": 8, "log_every": 2, "eval_every": 2,
                    "checkpoint_every": 2})
    c.optim.update({"warmup_steps": 1, "ema_decay": 0.0})
    c.relay.update({"eval_size": 16, "eval_batch": 16, "max_rounds": 4})
  return c
