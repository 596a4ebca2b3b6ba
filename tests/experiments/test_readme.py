"""Every command line the README shows runs as written (at the smoke preset where it names cpu or
paper, in a temporary directory where it names runs/).

`python -m experiments.main` lines run with --dry_run appended (the whole config and flag check,
nothing trained; every config's smoke preset trains end to end in tests/experiments/test_main.py),
except one GRPO line that runs for real from an empty directory, so the base run it needs is trained
first as the README says, and `--mode eval` lines, which evaluate a copy of a shared smoke run.
Other `python -m` lines must take every flag they show (their --help lists it); `make` lines must
name Makefile targets.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.experiments.smoke import ROOT, cli_env

README = os.path.join(ROOT, "README.md")


def readme_commands() -> list[str]:
  """Every command in the README's fenced blocks: continuation lines joined, comments dropped."""
  text = open(README).read()
  commands = []
  for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split("  #")[0].strip()
      if line.startswith((".venv/bin/", "make ", "python ")):
        commands.append(" ".join(line.split()))
  return commands


def _smoke(argv: list[str], tmp_path) -> list[str]:
  out = []
  for a in argv:
    a = re.sub(r"(\.py):(cpu|paper)", r"\1:smoke", a)
    out.append(str(tmp_path / a) if a.startswith("runs/") else a)
  return out


def test_the_readme_shows_commands():
  commands = readme_commands()
  assert len(commands) >= 10 and any("experiments.main" in c for c in commands), commands


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command, tmp_path, smoke_runs):
  argv = shlex.split(command)
  if argv[0] == "make":
    targets = set(re.findall(r"^([a-z][\w-]*):", open(os.path.join(ROOT, "Makefile")).read(), re.M))
    assert set(argv[1:]) <= targets, (argv, sorted(targets))
    return
  assert argv[0] == ".venv/bin/python" and argv[1] == "-m", command
  module, args = argv[2], _smoke(argv[3:], tmp_path)
  run = lambda *a: subprocess.run([sys.executable, "-m", module, *a], cwd=ROOT, env=cli_env(),
                                  capture_output=True, text=True, timeout=600)
  if module != "experiments.main":
    r = run("--help")
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
      assert flag in r.stdout, f"{command}: {flag} is not a flag of {module}"
    return
  if "--mode" in args and args[args.index("--mode") + 1] == "eval":
    workdir = args[args.index("--workdir") + 1]
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    os.rename(smoke_runs.copy("flow_2d_smoke", tmp_path), workdir)
    r = run(*args)
    assert r.returncode == 0 and "eval/loss" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    assert os.path.isfile(os.path.join(workdir, "evaluations.jsonl"))
    return
  if "precise_2d.py:smoke,precise" in " ".join(args):
    # For real, from nothing: the base run (../flow_2d_smoke of the workdir) is trained first.
    r = run(*args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "is at step 0 of" in r.stdout and "training it first" in r.stdout
    assert os.path.isdir(tmp_path / "runs" / "flow_2d_smoke" / "checkpoints")
    assert "finished at step" in r.stdout.splitlines()[-1]
    return
  r = run(*args, *([] if "--help" in args or "--dry_run" in args else ["--dry_run"]))
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert "--help" in args or "config OK" in r.stdout
  assert not (tmp_path / "runs").exists()          # a dry run writes nothing
