"""Two CPU processes joined by jax.distributed.initialize run the same steps as one process and
save/restore one checkpoint together."""
import json
import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _launch(pid, nproc, port, out, seed):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen([sys.executable, "-m", "tests.core.multihost_worker", str(pid), str(nproc),
                           str(port), str(out), str(seed)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path, seed):
  seed %= 1 << 31                     # PRNGKey keeps 32 bits of a seed
  port = portpicker.pick_unused_port()
  procs = [_launch(i, 2, port, tmp_path / f"p{i}.json", seed) for i in range(2)]
  single = _launch(0, 1, 0, tmp_path / "single.json", seed)
  for p in procs + [single]:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
  r0, r1, ref = (json.load(open(tmp_path / n)) for n in ("p0.json", "p1.json", "single.json"))
  assert r0["processes"] == 2 and r0["devices"] == 4 and ref["processes"] == 1
  assert r0["losses"] == r1["losses"]                     # every process sees the same global loss
  # The runs differ in float32 rounding only: the batch's sums are split over 4 devices or 2 (a
  # loss, the mean of 64 positive terms, moves by <= 64 * eps/2 = 4e-6 relatively), and the last
  # step's parameters by lr times Adam's rounding, small relative to each update unless a gradient
  # entry is at rounding level in both earlier steps (v ~ g0^2 + g1^2). The squared norm of the
  # (small, replicated) parameters is summed in the same order in both runs.
  np.testing.assert_allclose(r0["losses"], ref["losses"], rtol=1e-5)
  np.testing.assert_allclose(r0["param_sq_norm"], ref["param_sq_norm"], rtol=1e-5)
  for r in (r0, r1, ref):    # the checkpoint written by both processes restores what was saved
    assert r["restored_sq_norm"] == r["param_sq_norm"] and r["restored_data_step"] == 3
