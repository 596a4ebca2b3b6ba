"""One CLI for every experiment.

  python -m experiments.main --config experiments/configs/<exp>.py:<preset> --workdir DIR \
      [--config.train.num_steps=200 ...] [--coordinator_address HOST:PORT --num_processes N --process_id I]

Re-running the same command resumes from the latest checkpoint in DIR; a finished run exits 0.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiments/configs/<exp>.py:<preset>, preset in smoke | cpu | paper")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: config, metrics, checkpoints, outputs")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")


def available_configs() -> list[str]:
  return sorted(os.path.relpath(p) for p in glob.glob(os.path.join(CONFIG_DIR, "[!_]*.py")))


def load_config_module(path: str):
  if not os.path.isfile(path):
    raise ValueError(f"unknown config file {path!r}; valid configs: {', '.join(available_configs())}")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _flag_value(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
  return None


def validate_argv(argv: list[str]) -> None:
  """Checks config file, preset and override fields up front, so mistakes get one clear line."""
  spec = _flag_value(argv, "config")
  if spec is None:
    raise ValueError(f"--config is required; valid configs: {', '.join(available_configs())}")
  path, _, preset = spec.partition(":")
  module = load_config_module(path)
  presets = getattr(module, "PRESETS", ("smoke", "cpu", "paper"))
  if preset not in presets:
    raise ValueError(f"unknown preset {preset!r} for {path}; valid presets: {', '.join(presets)}")
  config = module.get_config(preset)
  for arg in argv:
    m = re.match(r"--config\.([^=]+)", arg)
    if not m:
      continue
    node, walked = config, []
    for part in m.group(1).split("."):
      if not hasattr(node, "keys") or part not in node:
        where = ".".join(walked) or "config"
        valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a group)"
        raise ValueError(f"unknown config field {m.group(1)!r}; valid fields of {where}: {valid}")
      node, walked = node[part], walked + [part]
  if _flag_value(argv, "workdir") is None:
    raise ValueError("--workdir is required")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every file it renames at INFO
  from core import sharding, train
  import experiments.tasks  # noqa: F401  (registers every task)
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train.train(_CONFIG.value, _WORKDIR.value)
  except (ValueError, train.NonFiniteError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def run():
  try:
    validate_argv(sys.argv[1:])
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(main)


if __name__ == "__main__":
  run()
