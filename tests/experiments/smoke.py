"""Smoke runs trained once per test session and shared by the CLI, table and GRPO tests; the CLI helpers.

Training a smoke run is mostly compilation; the CLI test, the table scripts and the GRPO configs all
need the same few base runs, so `smoke_runs` trains each through the CLI the first time a test asks
for it (under a file lock, so two xdist workers never train the same run twice) and copies the
finished workdir into the asking test's folder, where the test may write to it freely.
"""
import fcntl
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Workdir name (as the table scripts name them under --runs) -> the CLI's config argument.
SHARED_RUNS = {
    "flow_2d_smoke": "experiments/configs/flow_2d.py:smoke",
    "digits_smoke": "experiments/configs/flow_images.py:smoke",
    "image_crops_smoke": "experiments/configs/flow_images.py:smoke,image_crops",
    "relay_sudoku_relay_s0": "experiments/configs/relay_sudoku.py:smoke",
    "relay_code_relay": "experiments/configs/relay_code.py:smoke",
    # Fine-tunes its sibling flow_2d_smoke (config.grpo.base_workdir is "../flow_2d_smoke").
    "precise_2d_smoke": "experiments/configs/precise_2d.py:smoke",
    "pid_autoencoder_smoke": "experiments/configs/pid_autoencoder.py:smoke",
    "pid_backbone_smoke": "experiments/configs/pid.py:smoke,backbone",
    # The adapter on the frozen pid_backbone_smoke, conditioned through pid_autoencoder_smoke.
    "pid_x4_smoke": "experiments/configs/pid.py:smoke",
    "pid_latent_smoke": "experiments/configs/pid_latent.py:smoke",
    "pid_dmd_smoke": "experiments/configs/pid_distill.py:smoke",      # distils pid_x4_smoke
    "sana_sr_dcae_smoke": "experiments/configs/sana_sr.py:smoke,dcae",
    "sana_sr_prior_smoke": "experiments/configs/sana_sr.py:smoke,prior",
    # LoRA on the frozen sana_sr_prior_smoke and the encoder of sana_sr_dcae_smoke.
    "sana_sr_onestep_smoke": "experiments/configs/sana_sr.py:smoke",
}
# Runs a shared run needs next to it (trained first, so two workers never train one run at once).
NEEDS = {"precise_2d_smoke": ("flow_2d_smoke",),
         "pid_x4_smoke": ("pid_autoencoder_smoke", "pid_backbone_smoke"),
         "pid_latent_smoke": ("pid_autoencoder_smoke",),
         "pid_dmd_smoke": ("pid_x4_smoke",),
         "sana_sr_prior_smoke": ("sana_sr_dcae_smoke",),
         "sana_sr_onestep_smoke": ("sana_sr_dcae_smoke", "sana_sr_prior_smoke")}


def cli_env() -> dict:
  """The environment for CLI subprocesses (smoke runs, table scripts, notebooks): one CPU device (the
  8 fake devices of the root conftest would only slow a smoke run down) and XLA's LLVM optimisation
  off. A smoke run's programs run a few times each, so optimising them costs more than it saves
  (these end-to-end tests ran 14-22% faster at level 0); they check that runs finish with finite
  results, which the level does not change. The suite's in-process tests keep the default level."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  if not any(f.startswith("--xla_backend_optimization_level") for f in flags):
    flags.append("--xla_backend_optimization_level=0")
  return {**os.environ, "XLA_FLAGS": " ".join(flags)}


def cli(spec: str, workdir, *overrides, timeout: int = 600) -> subprocess.CompletedProcess:
  """`python -m experiments.main --config=spec --workdir=workdir *overrides` from the repo root."""
  return subprocess.run([sys.executable, "-m", "experiments.main", f"--config={spec}",
                         f"--workdir={workdir}", *overrides], cwd=ROOT, env=cli_env(),
                        capture_output=True, text=True, timeout=timeout)


class SmokeRuns:
  """Trains the runs of SHARED_RUNS on first use into a folder all workers see; `copy` hands out copies."""

  def __init__(self, root):
    self.root = root
    os.makedirs(root, exist_ok=True)

  def path(self, name: str) -> str:
    """The shared, finished workdir of `name` (read only: copy it before writing)."""
    for needed in NEEDS.get(name, ()):
      self.path(needed)
    workdir = os.path.join(self.root, name)
    with open(os.path.join(self.root, f"{name}.lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)      # the other worker waits here while this one trains
      done = os.path.join(self.root, f"{name}.done")
      if not os.path.exists(done):
        r = cli(SHARED_RUNS[name], workdir)   # resumes a run an earlier, killed session left
        assert r.returncode == 0, f"training the shared {name} failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}"
        open(done, "w").close()
    return workdir

  def copy(self, name: str, dest_dir, with_needed: bool = False) -> str:
    """A private copy of the finished run `name` at dest_dir/name (and, with_needed, of the runs it
    needs beside it); returns its path."""
    for needed in NEEDS.get(name, ()) if with_needed else ():
      if not os.path.exists(os.path.join(str(dest_dir), needed)):
        self.copy(needed, dest_dir)
    dest = os.path.join(str(dest_dir), name)
    shutil.copytree(self.path(name), dest)
    return dest


def run_table(name, tmp_path, smoke_runs, shared, *args, timeout=600):
  """Runs experiments.tables.<name> at the smoke preset over --runs tmp_path/runs, which starts with
  copies of the session's `shared` smoke runs (the table trains the rest); returns its output folder."""
  for run in shared:
    smoke_runs.copy(run, tmp_path / "runs")
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, "-m", f"experiments.tables.{name}", "--preset", "smoke",
                      "--runs", str(tmp_path / "runs"), "--out", str(out), *args],
                     cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  return out
