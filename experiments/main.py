"""One CLI for every experiment.

  python -m experiments.main --config experiments/configs/<exp>.py:<preset>[,<variant>] --workdir DIR \\
      [--config.train.num_steps=200 ...] [--dry_run] \\
      [--coordinator_address HOST:PORT --num_processes N --process_id I]
  python -m experiments.main --mode eval --workdir DIR [--step N]

Re-running the same command resumes from the latest checkpoint in DIR; a finished run exits 0. A
config that fine-tunes another run (GRPO) trains that run first when it is missing, and says so.
`--mode eval` runs the task's evaluation and sampling on DIR's latest (or step N's) checkpoint
without training: files as in training, metrics printed and appended to DIR/evaluations.jsonl.
`--help` lists every config with its presets and variants; `--dry_run` prints the resolved config
and checks it without touching DIR. Exit status: 0 done, 1 failed while running, 2 bad command line
or config (nothing written).
"""
from __future__ import annotations

import ast
import glob
import importlib.util
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.configs import _base

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiments/configs/<exp>.py:<preset>[,<variant>], preset in smoke | cpu | paper")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory: config, metrics, checkpoints, outputs")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train (or resume) --config in --workdir, or eval: evaluate its checkpoint")
_STEP = flags.DEFINE_integer("step", None, "--mode eval: the checkpoint step (default: the latest)")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "print the resolved config, check it, and exit")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
_FLAGS = (_WORKDIR, _MODE, _STEP, _DRY_RUN, _COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)


class UsageError(ValueError):
  """A bad command line or config: reported in one line, exit status 2, nothing written."""


def available_configs() -> list[str]:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(CONFIG_DIR, "[!_]*.py")))


def _resolve(path: str) -> str:
  """A config path as given, else relative to the repository (the CLI may run from anywhere)."""
  if os.path.isfile(path):
    return path
  in_repo = os.path.join(os.path.dirname(CONFIG_DIR), os.pardir, path)
  return os.path.normpath(in_repo) if os.path.isfile(in_repo) else path


def load_config_module(path: str):
  path = _resolve(path)
  if not os.path.isfile(path):
    raise UsageError(f"unknown config file {path!r}; valid configs: {', '.join(available_configs())}")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def variants(module) -> tuple[str, ...]:
  """The config module's declared variants (the first is the default); () when it has none."""
  return tuple(getattr(module, "VARIANTS", ()))


def config_args(module) -> list[str]:
  """Every `preset[,variant]` the config module accepts."""
  return _base.config_args(variants(module))


def usage() -> str:
  """--help: the module docstring, every config with its variants, and the flags."""
  lines = [__doc__.strip(), "", "configs (presets: " + " | ".join(_base.PRESETS) + "):"]
  for path in available_configs():
    module = load_config_module(path)
    doc = (module.__doc__ or "").strip().splitlines()
    lines.append(f"  {path}  {doc[0] if doc else ''}")
    if variants(module):
      v = variants(module)
      lines.append(f"      variants: {v[0]} (default), {', '.join(v[1:])}  e.g. :cpu,{v[1]}")
  lines += ["", "flags:", "  --config PATH:PRESET[,VARIANT]  (required)",
            "  --config.<field>=<value>  override any field of the resolved config (see --dry_run)"]
  lines += [f"  --{f.name}  {flags.FLAGS[f.name].help}" for f in _FLAGS]
  return "\n".join(lines)


def _flag_value(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
  return None


def _check_value(field: str, default, text: str) -> None:
  """Raises UsageError when `text` cannot become the type of the field's default."""
  kind = type(default)
  try:
    if isinstance(default, bool):
      ok = text.lower() in ("true", "false", "1", "0")
    elif isinstance(default, (int, float)):
      value = ast.literal_eval(text)
      ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
          kind is float or isinstance(value, int))
    elif isinstance(default, (list, tuple)):
      ok = isinstance(ast.literal_eval(text), (list, tuple))
    else:
      ok = True
  except (ValueError, SyntaxError):
    ok = False
  if not ok:
    raise UsageError(f"--config.{field}={text!r}: expected {kind.__name__} like {default!r}")


def validate_argv(argv: list[str]):
  """Checks config file, preset, variant and every override's field and type up front (so mistakes
  get one clear line before anything runs); returns the config module (None in eval mode)."""
  mode = _flag_value(argv, "mode") or "train"
  if mode not in ("train", "eval"):
    raise UsageError(f"--mode={mode!r}; expected train or eval")
  if mode == "eval":
    workdir = _flag_value(argv, "workdir")
    if workdir is None:
      raise UsageError("--mode eval needs --workdir (a run directory)")
    if not os.path.isfile(os.path.join(workdir, "config.json")):
      raise UsageError(f"--workdir {workdir} is not a run directory (no config.json)")
    if any(a.startswith("--config") for a in argv):
      raise UsageError("--mode eval takes the config from --workdir/config.json; drop --config")
    step = _flag_value(argv, "step")
    if step is not None and not step.isdigit():
      raise UsageError(f"--step={step!r}: expected a checkpoint step (a non-negative integer)")
    return None
  if _flag_value(argv, "step") is not None:
    raise UsageError("--step is for --mode eval")
  spec = _flag_value(argv, "config")
  if spec is None:
    raise UsageError(f"--config is required; valid configs: {', '.join(available_configs())}")
  path, _, arg = spec.partition(":")
  module = load_config_module(path)
  try:
    _base.parse_arg(arg, variants(module))
  except ValueError as e:
    raise UsageError(f"{e}; {path} accepts {' | '.join(config_args(module))}") from None
  config = module.get_config(arg)
  for arg in argv:
    m = re.match(r"--config\.([^=]+)(?:=(.*))?", arg)
    if not m:
      continue
    node, walked = config, []
    for part in m.group(1).split("."):
      if not hasattr(node, "keys") or part not in node:
        where = ".".join(walked) or "config"
        valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a group)"
        raise UsageError(f"unknown config field {m.group(1)!r}; valid fields of {where}: {valid}")
      node, walked = node[part], walked + [part]
    if m.group(2) is not None:
      _check_value(m.group(1), node, m.group(2))
  dry_run = "--dry_run" in argv or _flag_value(argv, "dry_run") in ("true", "True", "1")
  if _flag_value(argv, "workdir") is None and not dry_run:
    raise UsageError("--workdir is required")
  return module


def evaluate() -> None:
  from core import train
  try:
    train.evaluate_checkpoint(_WORKDIR.value, _STEP.value)
  except (train.ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every file it renames at INFO
  from core import registry, sharding, train
  import experiments.tasks  # noqa: F401  (registers every task)
  if _MODE.value == "eval":
    return evaluate()
  config = _CONFIG.value
  if _DRY_RUN.value:
    print(config)
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train.check_config(config)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if _DRY_RUN.value:
    print("config OK (dry run: nothing written)")
    return
  try:
    try:
      train.check_config_compatible(_WORKDIR.value, config)   # before a base run is trained for it
    except ValueError as e:
      raise train.ConfigError(str(e)) from e
    if train.trained_steps(_WORKDIR.value) < int(config.train.num_steps):   # a finished run needs nothing
      registry.prepare(config, _WORKDIR.value)
    train.train(config, _WORKDIR.value)
  except train.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (ValueError, train.NonFiniteError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _with_config_path_resolved(argv: list[str]) -> list[str]:
  """argv with --config's file resolved (config_flags opens it relative to the current directory)."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg == "--config" and i + 1 < len(out):
      path, colon, rest = out[i + 1].partition(":")
      out[i + 1] = _resolve(path) + colon + rest
    elif arg.startswith("--config="):
      path, colon, rest = arg.split("=", 1)[1].partition(":")
      out[i] = f"--config={_resolve(path)}{colon}{rest}"
  return out


def run():
  argv = sys.argv[1:]
  if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv):
    print(usage())
    sys.exit(0)
  try:
    validate_argv(argv)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  app.run(main, argv=[sys.argv[0], *_with_config_path_resolved(argv)])


if __name__ == "__main__":
  run()
