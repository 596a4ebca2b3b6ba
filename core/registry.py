"""Name -> task builder registry: a config names its trainer/evaluator by `config.task`.

A task builder is `build(config) -> core.train.Task`. Method packages register theirs at import time;
`experiments/tasks.py` imports every module that registers one.
"""
from collections.abc import Callable

_TASKS: dict[str, Callable] = {}


def register(name: str) -> Callable[[Callable], Callable]:
  def wrap(build: Callable) -> Callable:
    if name in _TASKS and _TASKS[name] is not build:
      raise ValueError(f"task {name!r} is registered twice")
    _TASKS[name] = build
    return build
  return wrap


def get(name: str) -> Callable:
  if name not in _TASKS:
    raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(_TASKS)}")
  return _TASKS[name]


def names() -> list[str]:
  return sorted(_TASKS)
