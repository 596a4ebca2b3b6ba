"""Name -> task builder registry: a config names its trainer/evaluator by `config.task`.

A task builder is `build(config, workdir) -> core.train.Task` (workdir: the run's directory, or None
outside a run). Method packages register theirs at import time; `experiments/tasks.py` imports every
module that registers one.
"""
from collections.abc import Callable

_TASKS: dict[str, Callable] = {}
_CHECKS: dict[str, Callable] = {}
_PREPARES: dict[str, Callable] = {}


def register(name: str, check: Callable | None = None,
             prepare: Callable | None = None) -> Callable[[Callable], Callable]:
  """Registers `build` under `name`.

  check(config), if given, raises ValueError on a config the task cannot run. It must be cheap (no
  data, no models): the trainer calls it before writing anything.
  prepare(config, workdir), if given, makes what `build` needs from other runs (GRPO's base model),
  training them when missing. The CLI and the table scripts call it explicitly before training;
  `build` itself never trains, it raises when a run it needs is missing.
  """
  def wrap(build: Callable) -> Callable:
    if name in _TASKS and _TASKS[name] is not build:
      raise ValueError(f"task {name!r} is registered twice")
    _TASKS[name] = build
    if check is not None:
      _CHECKS[name] = check
    if prepare is not None:
      _PREPARES[name] = prepare
    return build
  return wrap


def prepare(config, workdir: str) -> None:
  """The registered task's `prepare(config, workdir)`, if it has one."""
  if config.task in _PREPARES:
    _PREPARES[config.task](config, workdir)


def check(config) -> None:
  """The registered task's own config checks (ValueError on a bad config); unknown task names too."""
  get(config.task)
  if config.task in _CHECKS:
    _CHECKS[config.task](config)


def check_choices(config, choices: dict[str, tuple]) -> None:
  """Raises ValueError naming the first dotted `config` field whose value is not among its choices."""
  for field, valid in choices.items():
    value = config
    for part in field.split("."):
      value = value[part]
    if value not in valid:
      raise ValueError(f"config.{field}={value!r}; expected one of {', '.join(map(str, valid))}")


def get(name: str) -> Callable:
  if name not in _TASKS:
    raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(_TASKS)}")
  return _TASKS[name]


def names() -> list[str]:
  return sorted(_TASKS)
