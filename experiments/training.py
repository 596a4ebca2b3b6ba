"""What the table scripts share: their command line, and training (or reusing) a config's run with its cost."""
from __future__ import annotations

import argparse
import json
import os

import ml_collections

from core import registry, train
from experiments.configs import _base


def table_parser(doc: str, outputs: str, replot: bool = False) -> argparse.ArgumentParser:
  """The table scripts' common flags --preset, --runs and --out (and --replot for a script that can
  redraw its plots from its JSON); `doc` is the script's docstring and `outputs` names what it
  writes into --out."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0])
  parser.add_argument("--preset", choices=_base.PRESETS, default="cpu")
  parser.add_argument("--runs", default="runs/tables", help="where the trained models' workdirs live")
  parser.add_argument("--out", default="results", help=f"where {outputs} go")
  if replot:
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the plots from the JSON already in --out (no training or "
                             "evaluation)")
  return parser


def read_report(out: str, name: str) -> dict:
  """A table's JSON report OUT/NAME (for --replot); SystemExit naming the file when it is missing."""
  path = os.path.join(out, name)
  if not os.path.isfile(path):
    raise SystemExit(f"error: --replot needs {path}; run the table without --replot first")
  with open(path) as f:
    return json.load(f)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def train_timed(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) `config` in `workdir` (after the runs it needs, `registry.prepare`); returns
  steps, batch, EMA decay, the last evaluation's metrics ("final_eval": {"eval/...": value}) and
  "seconds": the trainer's own training wall-clock (evaluation and sampling excluded, summed over
  resumed runs), so a finished run that is reused still reports its time."""
  registry.prepare(config, workdir)     # e.g. GRPO's base run, trained (and timed) on its own
  end = train.train(config, workdir)
  rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  evals = [e for e in ({k: v for k, v in row.items() if k.startswith("eval/")} for row in rows) if e]
  return {"steps": end, "batch": int(config.train.global_batch_size),
          "ema_decay": float(config.optim.ema_decay), "final_eval": evals[-1] if evals else {},
          "seconds": max(row.get("train_seconds", 0.0) for row in rows)}


def training_section(trained: dict, eval_note: str = "") -> list[str]:
  """A table's "## Training" markdown lines: per run (`train_timed` results) its steps, batch, training
  seconds and last evaluation."""
  lines = ["## Training", "", f"| run | steps | batch | train s | its last evaluation{eval_note} |",
           "|---|---:|---:|---:|---|"]
  for name, t in trained.items():
    evals = ", ".join(f"{k[5:]} {v:.3g}" for k, v in t["final_eval"].items() if not k.endswith("_std"))
    lines.append(f"| {name} | {t['steps']} | {t['batch']} | {t['seconds']:.0f} | {evals} |")
  return lines


def write_report(out: str, stem: str, result: dict, text: str) -> None:
  """OUT/STEM.json (the result) and OUT/STEM.md (its markdown)."""
  with open(os.path.join(out, f"{stem}.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out, f"{stem}.md"), "w") as f:
    f.write(text)
