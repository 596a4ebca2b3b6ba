"""What the table scripts share: their command line, and training (or reusing) a config's run with its cost."""
from __future__ import annotations

import argparse
import json
import os
import time

import ml_collections

from core import train
from experiments.configs import _base


def table_parser(doc: str, outputs: str) -> argparse.ArgumentParser:
  """The table scripts' common flags --preset, --runs and --out; `doc` is the script's docstring and
  `outputs` names what it writes into --out."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--preset", choices=_base.PRESETS, default="cpu")
  parser.add_argument("--runs", default="runs/tables", help="where the trained models' workdirs live")
  parser.add_argument("--out", default="results", help=f"where {outputs} go")
  return parser


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def train_timed(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) `config` in `workdir`; returns steps, batch, EMA decay, the last evaluation's
  metrics ("final_eval": {"eval/...": value}) and seconds.

  The wall-clock seconds of every call that trained are summed in `workdir/train_seconds.json`, so a
  finished run that is reused still reports its time; `timed_steps` says how many steps they cover.
  """
  path = os.path.join(workdir, "train_seconds.json")
  record = {"seconds": 0.0, "timed_steps": 0}
  if os.path.exists(path):
    with open(path) as f:
      record = json.load(f)
  ckpt = train.Checkpointer(workdir, keep=1_000_000)
  start = ckpt.latest_step() or 0
  ckpt.close()
  t0 = time.perf_counter()
  end = train.train(config, workdir)
  if end > start:
    record = {"seconds": record["seconds"] + time.perf_counter() - t0,
              "timed_steps": record["timed_steps"] + end - start}
    with open(path, "w") as f:
      json.dump(record, f)
  evals = [{k: v for k, v in row.items() if k.startswith("eval/")}
           for row in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
  evals = [e for e in evals if e]
  return {"steps": end, "batch": int(config.train.global_batch_size),
          "ema_decay": float(config.optim.ema_decay), "final_eval": evals[-1] if evals else {},
          **record}
