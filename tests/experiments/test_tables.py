"""Table scripts: the flow table end to end at the smoke preset, and its distances on known answers."""
import json
import os
import subprocess
import sys

import numpy as np

from experiments.tables import flow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _numbers(tree):
  if isinstance(tree, dict):
    return [x for v in tree.values() for x in _numbers(v)]
  if isinstance(tree, list):
    return [x for v in tree for x in _numbers(v)]
  return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_flow_table_smoke_writes_finite_results(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, "-m", "experiments.tables.flow", "--preset", "smoke",
                      "--runs", str(tmp_path / "runs"), "--out", str(out)],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  for name in ("flow.md", "flow.json", "flow_2d_samples.png", "flow_digits_samples.png"):
    assert (out / name).stat().st_size > 0, name
  result = json.loads((out / "flow.json").read_text())
  numbers = _numbers(result)
  assert numbers and np.all(np.isfinite(numbers))
  rows = {row["steps"]: row for row in result["flow_2d"]["rows"]}
  floor, noise = rows[None], rows[0]
  assert floor["energy"] < noise["energy"] and floor["sw1"] < noise["sw1"]
  assert floor["ring_fraction"] > 0.95 > noise["ring_fraction"]
  assert set(flow.STEPS) <= set(rows)
  settings = {(row["steps"], row["cfg_scale"]) for row in result["digits"]["rows"]}
  assert {(s, c) for s in flow.STEPS for c in flow.CFG_SCALES} <= settings
  assert 0.8 < result["digits"]["classifier_test_accuracy"] <= 1.0
  md = (out / "flow.md").read_text()
  assert "| held-out data (floor) |" in md and "| 50 | 4 |" in md


def test_ring_fraction_and_class_diversity():
  angle = np.random.default_rng().uniform(0, 2 * np.pi, 4)
  radii = np.array([1.1, 1.9, 1.5, 2.5])   # within 0.15 of a ring: the first two
  points = radii[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
  assert flow.ring_fraction(points) == 0.5
  images = np.zeros((4, 2, 2, 1))
  images[1] += 1.0      # class 0: distance 2 (four pixels differ by 1)
  images[3] += 3.0      # class 1: distance 6
  np.testing.assert_allclose(flow.class_diversity(images, np.array([0, 0, 1, 1])), 4.0)
