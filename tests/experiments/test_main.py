"""The CLI end to end: every config's smoke preset, resume after SIGKILL, SIGTERM, bad input."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import main as main_cli
from tests.experiments.smoke import SHARED_RUNS, cli, cli_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLOW_2D = "experiments/configs/flow_2d.py"


def _cmd(config, workdir, *overrides):
  return [sys.executable, "-m", "experiments.main", f"--config={config}", f"--workdir={workdir}",
          *overrides]


def _run(config, workdir, *overrides, timeout=600):
  return cli(config, workdir, *overrides, timeout=timeout)


def _smoke_specs():
  """Every config's smoke preset (its default variant) and every variant a shared run trains; the
  other variants' configs are checked in test_every_preset_and_variant_resolves_and_passes_checks."""
  specs = [f"{path}:smoke" for path in main_cli.available_configs()]
  return specs + sorted(set(SHARED_RUNS.values()) - set(specs))


@pytest.mark.slow
@pytest.mark.parametrize("spec", list(_smoke_specs()))
def test_every_config_smoke_preset_runs_end_to_end(spec, tmp_path, smoke_runs):
  path, preset = spec.split(":")
  config = main_cli.load_config_module(path).get_config(preset)
  shared = {v: k for k, v in SHARED_RUNS.items()}
  overrides = ()
  if spec in shared:                  # trained once for the session by the same command
    workdir = smoke_runs.copy(shared[spec], tmp_path)
  else:
    workdir = tmp_path / "run"
    if config.task == "flow_grpo":    # fine-tunes a copy of the shared base run, its sibling
      assert config.grpo.base_workdir.startswith("../")     # relative to the GRPO workdir
      smoke_runs.copy(os.path.basename(config.grpo.base_workdir), tmp_path)
    r = _run(spec, workdir, *overrides)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  workdir = pathlib.Path(workdir)
  config = json.load(open(workdir / "config.json"))
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  last = max(r["step"] for r in rows)
  assert last == config["train"]["num_steps"]
  assert all(np.isfinite(v) for r in rows for v in r.values())
  assert any(k.startswith("eval/") for r in rows for k in r)
  assert os.listdir(workdir / "tensorboard")
  assert str(last) in os.listdir(workdir / "checkpoints")
  if config["task"] == "flow_matching":          # the task with a sample hook writes image grids
    pngs = [f for f in os.listdir(workdir / "samples") if f.endswith(".png")]
    assert f"step_{last:07d}.png" in pngs
    from tests.core.test_writers import _tensorboard_events
    tags = {(e.step, v.tag) for e in _tensorboard_events(workdir / "tensorboard")
            if e.HasField("summary") for v in e.summary.value}
    assert (last, "sample/grid") in tags and any(t.startswith("config") for _, t in tags)
  if spec == f"{FLOW_2D}:smoke":   # a finished run says so and exits 0 (checked once: the check is
    again = _run(spec, workdir, *overrides)     # the CLI's, not the task's, and a start costs ~4 s)
    assert again.returncode == 0 and "already finished" in again.stdout


def _final_params(workdir):
  from core import train
  import experiments.tasks  # noqa: F401
  params, _ = train.restore_params(str(workdir), ema=False)
  return params


def _wait_for_checkpoint(proc, workdir, min_step, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = [int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()] \
        if (workdir / "checkpoints").exists() else []
    if steps and max(steps) >= min_step:
      return max(steps)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    time.sleep(0.05)
  raise TimeoutError("no checkpoint appeared")


def _start(workdir, overrides):
  return subprocess.Popen(_cmd(f"{FLOW_2D}:smoke", workdir, *overrides), cwd=ROOT, env=cli_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


LONG = ["--config.train.num_steps=400", "--config.train.checkpoint_every=20",
        "--config.train.eval_every=0", "--config.train.sample_every=0"]


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
  killed, straight = tmp_path / "killed", tmp_path / "straight"
  proc = _start(killed, LONG)
  _wait_for_checkpoint(proc, killed, 100)
  proc.kill()
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  steps = sorted(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
  assert 0 < steps[-1] < 400, steps                   # really killed mid-way
  resumed = _run(f"{FLOW_2D}:smoke", killed, *LONG)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {steps[-1]}" in resumed.stdout
  r = _run(f"{FLOW_2D}:smoke", straight, *LONG)
  assert r.returncode == 0, r.stderr[-3000:]
  # The console's step lines show what metrics.jsonl holds: the means since the previous row.
  logged = {row["step"]: row for row in map(json.loads, open(straight / "metrics.jsonl"))
            if "train/loss" in row}
  printed = [l for l in r.stdout.splitlines() if " mean since last row: " in l]
  assert len(printed) == 100
  for line in printed:
    step = int(line.split()[1].split("/")[0])
    loss = float(line.split(" loss ")[1].split()[0])
    assert f"{logged[step]['train/loss']:.4g}" == f"{loss:.4g}"
  a, b = _final_params(killed), _final_params(straight)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The rows the killed run logged after its last checkpoint were dropped on resume: the log is the
  # uninterrupted run's, row for row (windows of log_every = 4 steps align with the checkpoints);
  # only the wall-clock differs, and it never runs backwards.
  rows = lambda w: [json.loads(l) for l in open(w / "metrics.jsonl")]
  untimed = lambda w: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows(w)]
  assert untimed(killed) == untimed(straight)
  clock = [r["train_seconds"] for r in rows(killed)]
  assert clock == sorted(clock) and clock[0] > 0


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_a_checkpoint_before_exiting(sig, status, tmp_path):
  proc = _start(tmp_path, LONG)
  seen = _wait_for_checkpoint(proc, tmp_path, 20)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == status, err[-3000:]
  assert "Traceback" not in err
  name = signal.Signals(sig).name
  assert f"{name}: saved checkpoint at step" in out
  saved = int(out.split(f"{name}: saved checkpoint at step ")[1].split()[0])
  assert saved >= seen and str(saved) in os.listdir(tmp_path / "checkpoints")


@pytest.mark.parametrize("args, expected", [
    (["--config=experiments/configs/nope.py:smoke"], "valid configs: experiments/configs/flow_2d.py"),
    ([f"--config={FLOW_2D}:huge"], "valid presets: smoke, cpu, paper"),
    ([f"--config={FLOW_2D}:smoke", "--config.train.nmu_steps=3"], "valid fields of train: "),
    ([f"--config={FLOW_2D}:smoke", "--config.modle.width=3"], "valid fields of config: "),
    ([f"--config={FLOW_2D}:smoke", "--config.train.num_steps=abc"], "expected int like 12"),
    ([f"--config={FLOW_2D}:smoke", "--config.optim.lr=fast"], "expected float like"),
    ([f"--config={FLOW_2D}:smoke,big"], "this config has no variants"),
    (["--config=experiments/configs/precise_2d.py:smoke,precis"],
     "valid variants: precise, flow_grpo, dance, cps, dance_precise, precise_published, "
     "flow_grpo_published, dance_published, cps_published"),
])
def test_bad_config_gives_one_line_listing_choices(args, expected, tmp_path):
  r = subprocess.run([sys.executable, "-m", "experiments.main", *args, f"--workdir={tmp_path}"],
                     cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0], r.stderr


@pytest.mark.slow
def test_incompatible_workdir_is_refused(tmp_path):
  assert _run(f"{FLOW_2D}:smoke", tmp_path, "--config.train.num_steps=2").returncode == 0
  before = (tmp_path / "config.json").read_text()
  r = _run(f"{FLOW_2D}:smoke", tmp_path, "--config.train.num_steps=4", "--config.model.depth=3")
  assert r.returncode == 2
  assert "incompatible config" in r.stderr and "model.depth (2 -> 3)" in r.stderr
  assert (tmp_path / "config.json").read_text() == before


@pytest.mark.parametrize("spec, overrides, expected", [
    ("relay_sudoku.py:smoke", ["--config.relay.objective=relayy"],
     "config.relay.objective='relayy'; expected one of mlm, rollout, relay, relay_sg"),
    ("flow_2d.py:smoke", ["--config.train.global_batch_size=12"],
     "global batch size 12 is not divisible by the 8 batch shards"),
    ("flow_images.py:smoke", ["--config.flow.time_kind=logit"], "config.flow.time_kind='logit'"),
    ("precise_2d.py:smoke", ["--config.grpo.window_kind=slide"], "config.grpo.window_kind='slide'"),
])
def test_bad_values_are_refused_before_the_workdir_is_touched(spec, overrides, expected, tmp_path):
  """One line, exit 2, and no workdir: the corrected command then starts cleanly."""
  env = {**cli_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  r = subprocess.run(_cmd(f"experiments/configs/{spec}", tmp_path / "run", *overrides), cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0], r.stderr
  assert not (tmp_path / "run").exists()


def test_help_lists_every_config_preset_and_variant():
  r = subprocess.run([sys.executable, "-m", "experiments.main", "--help"], cwd="/", env=cli_env(),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  for path in main_cli.available_configs():
    assert path in r.stdout
    for variant in main_cli.variants(main_cli.load_config_module(path)):
      assert variant in r.stdout
  assert "smoke | cpu | paper" in r.stdout and "--dry_run" in r.stdout


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path):
  # A published-recipe variant: the sampler and its paper's recipe from the command line.
  r = subprocess.run(_cmd("experiments/configs/precise_2d.py:smoke,cps_published", tmp_path / "run",
                          "--config.train.num_steps=7", "--dry_run"), cwd=tmp_path, env=cli_env(),
                     capture_output=True, text=True, timeout=120)     # from outside the repository
  assert r.returncode == 0, r.stderr[-2000:]
  for line in ("sampler: cps", "recipe: published", "num_steps: 7", "eta: 0.8", "beta: 0.04"):
    assert line in r.stdout, line
  assert "config OK" in r.stdout and not (tmp_path / "run").exists()


def test_every_preset_and_variant_resolves_and_passes_checks():
  """get_config and the task's own checks for every `preset[,variant]` of every config; the sampler
  variants select the sampler and recipe (the README's `precise_*.py:cpu,<sampler>` commands)."""
  import experiments.tasks  # noqa: F401
  from core import registry
  for path in main_cli.available_configs():
    module = main_cli.load_config_module(path)
    for arg in main_cli.config_args(module):
      config = module.get_config(arg)
      registry.check(config)
      assert config.preset == arg.split(",")[0]
  for name in ("precise_2d", "precise_digits"):
    module = main_cli.load_config_module(f"experiments/configs/{name}.py")
    assert module.get_config("cpu").grpo.sampler == "precise"
    fg = module.get_config("cpu,flow_grpo_published").grpo
    assert (fg.sampler, fg.recipe, fg.eta, fg.clip_range) == ("flow_grpo", "published", 0.7, 1e-4)


def _eval_rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "evaluations.jsonl"))]


# One shared run per task (flow_matching on points and on images, relay_sudoku, relay_code, flow_grpo).
EVAL_RUNS = ("flow_2d_smoke", "digits_smoke", "relay_sudoku_relay_s0", "relay_code_relay", "precise_2d_smoke")


@pytest.mark.slow
@pytest.mark.parametrize("name", EVAL_RUNS)
def test_eval_mode_reevaluates_a_checkpoint_without_training(name, tmp_path, smoke_runs):
  """--mode eval on a finished run (from another directory): the task's metrics at the final step,
  equal to the training run's own final evaluation, printed and appended to evaluations.jsonl; the
  checkpoints and metrics.jsonl are untouched."""
  workdir = pathlib.Path(smoke_runs.copy(name, tmp_path, with_needed=True))
  before = {p: (workdir / p).read_bytes() for p in ("metrics.jsonl", "config.json")}
  steps = sorted(os.listdir(workdir / "checkpoints"))
  r = subprocess.run([sys.executable, "-m", "experiments.main", "--mode=eval", f"--workdir={workdir}"],
                     cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  final = [row for row in map(json.loads, open(workdir / "metrics.jsonl"))
           if any(k.startswith("eval/") for k in row)][-1]
  (row,) = _eval_rows(workdir)
  assert row["step"] == final["step"]
  evals = {k: v for k, v in final.items() if k.startswith("eval/")}
  assert evals and set(evals) <= set(row)
  for k, v in evals.items():
    np.testing.assert_allclose(row[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert f"{k} {row[k]:.4g}" in r.stdout
  assert {p: (workdir / p).read_bytes() for p in before} == before
  assert sorted(os.listdir(workdir / "checkpoints")) == steps
  assert "training" not in r.stdout
  assert os.listdir(workdir / "tensorboard_eval")


@pytest.mark.slow
def test_eval_mode_takes_a_step_and_names_the_saved_steps(tmp_path, smoke_runs):
  workdir = smoke_runs.copy("flow_2d_smoke", tmp_path)
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  base = [sys.executable, "-m", "experiments.main", "--mode=eval", f"--workdir={workdir}"]
  run = lambda *a: subprocess.run([*base, *a], cwd=ROOT, env=cli_env(), capture_output=True,
                                  text=True, timeout=300)
  r = run(f"--step={steps[0]}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert _eval_rows(workdir)[-1]["step"] == steps[0]
  r = run("--step=99999")
  assert r.returncode == 2
  assert "no checkpoint of step 99999" in r.stderr and f"saved steps: {steps[0]}" in r.stderr


@pytest.mark.parametrize("args, expected", [
    (["--mode=eval"], "--mode eval needs --workdir"),
    (["--mode=eval", "--workdir=/nonexistent/run"], "is not a run directory (no config.json)"),
    (["--mode=eval", "--workdir=/", f"--config={FLOW_2D}:smoke"], "is not a run directory"),
    (["--mode=score", "--workdir=/"], "--mode='score'; expected train or eval"),
    ([f"--config={FLOW_2D}:smoke", "--workdir=/tmp/x", "--step=3"], "--step is for --mode eval"),
])
def test_bad_eval_command_lines_get_one_line(args, expected):
  r = subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=ROOT, env=cli_env(),
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and expected in lines[0], r.stderr


@pytest.mark.slow
def test_restore_params_reads_only_the_workdir(tmp_path, smoke_runs, monkeypatch):
  """A GRPO run restored from an unrelated directory with its base run gone: restore_params builds
  nothing (no data, no base run, no training) and writes nothing; building the task says the base
  run is missing instead of training one."""
  import experiments.tasks  # noqa: F401
  from core import train
  workdir = smoke_runs.copy("precise_2d_smoke", tmp_path / "moved")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  params, config = train.restore_params(workdir)
  assert config.task == "flow_grpo" and config.grpo.base_workdir == "../flow_2d_smoke"
  base, _ = train.restore_params(smoke_runs.path("flow_2d_smoke"))
  assert jax.tree.structure(params) == jax.tree.structure(base)       # full fine-tuning: same tree
  assert any(np.any(np.asarray(a) != np.asarray(b))
             for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base)))
  with pytest.raises(FileNotFoundError, match="moved/flow_2d_smoke.* is at step 0 of"):
    train.build_task(config, workdir)
  assert os.listdir(elsewhere) == [] and sorted(os.listdir(tmp_path / "moved")) == ["precise_2d_smoke"]
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    train.restore_params(str(elsewhere))
