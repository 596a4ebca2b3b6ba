"""The relay tasks through the trainer: a sharded step with the rollout buffer, and the solve CLI."""
import functools

import jax
import numpy as np
import pytest

import experiments.tasks  # noqa: F401  (registers the tasks)
from core import data, sharding, train
from experiments.configs import relay_sudoku
from relay_jax import solve, sudoku, task as relay_task


def _config(objective):
  c = relay_sudoku.get_config("smoke")
  c.relay.objective = objective
  c.optim.update({"name": "sgd", "b1": 0.9})   # linear in the gradient: well conditioned to compare
  # Step 1's learning rate is 0 (the first warm-up step), so both steps run from the initial
  # parameters, bit for bit the same on both meshes, and take the same reveal decisions (discrete:
  # an argmax of confidences, which a rounding difference could flip at a near-tie). Updated
  # parameters differ by rounding (the meshes sum gradients in different orders).
  c.optim.warmup_steps = 1
  return c


@functools.cache
def _setup(objective, sharded):
  """The trainer and its mesh (one device, or data 4 x fsdp 2), built once: every draw then runs
  the same compiled init and step (a fresh setup per call would also pile up executables over
  `--seeds` runs)."""
  mesh = (sharding.make_mesh({"data": 4, "fsdp": 2, "model": 1}) if sharded else
          sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  return train.setup(_config(objective), mesh), mesh


def _steps(objective, sharded, key, batches):
  run, mesh = _setup(objective, sharded)
  state = run.init(key)
  for b in batches:
    state, metrics = run.step(state, sharding.global_batch(b, mesh))
  return state, metrics


@pytest.mark.parametrize("objective", ["relay", "mlm"])
def test_sharded_step_equals_single_device_step(objective, rng):
  source = data.load_in_memory("sudoku", "train", config="tiny").arrays
  idx = [rng.choice(len(source["puzzle"]), 16, replace=False) for _ in range(2)]
  batches = [{"x0": source["solution"][i].astype(np.int32), "maskable": source["puzzle"][i] == 0}
             for i in idx]
  key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
  s1, m1 = _steps(objective, False, key, batches)
  s8, m8 = _steps(objective, True, key, batches)
  np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(s1.carry), jax.tree.leaves(s8.carry)):   # the rollout buffer
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  if objective == "relay":
    assert s8.carry["x"].sharding.spec[0] == sharding.BATCH_AXES


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("relay_smoke")
  train.train(relay_sudoku.get_config("smoke"), str(workdir))
  return workdir


@pytest.mark.slow
def test_solve_cli_good_and_bad_lines(trained, tmp_path, capsys):
  test = data.load_in_memory("sudoku", "test", config="tiny").arrays
  grid = lambda k, key="puzzle": sudoku.format_grid(test[key][k])
  lines = [grid(0),
           grid(1) + "\t" + grid(1, "solution") + "\t3.5",            # a rating column: ignored
           "123",                                                  # too short
           "55" + "." * 79,                                        # contradicting clues
           "a" + "." * 80,                                         # bad character
           grid(2).replace(".", "0"),
           grid(3) + "\t" + grid(3, "solution")]
  path = tmp_path / "puzzles.txt"
  path.write_text("\n".join(lines) + "\n")
  summary = solve.main(["--workdir", str(trained), "--puzzles", str(path)])
  captured = capsys.readouterr()
  for number in (3, 4, 5):
    assert f"puzzles.txt:{number}: skipped" in captured.err
  assert captured.err.count("columns after the solution are ignored") == 1
  header, *out = (tmp_path / "puzzles.txt.solved").read_text().splitlines()
  assert header == "#line\tpuzzle\tanswer\tnfe\tvalid\tcorrect"
  rows = [l.split("\t") for l in out]
  assert [int(r[0]) for r in rows] == [1, 2, 6, 7]
  valid, exact = 0, 0
  for r, k in zip(rows, (0, 1, 2, 3)):
    assert r[1] == grid(k)
    answer = np.array([0 if c == "." else int(c) for c in r[2]])
    puzzle = test["puzzle"][k]
    ok = sudoku.is_valid_solution(answer) and (answer[puzzle != 0] == puzzle[puzzle != 0]).all()
    assert r[4] == str(int(ok)) and 1 <= int(r[3]) <= 8
    valid += ok
    if k in (1, 3):          # the lines with a solution
      right = bool((answer == test["solution"][k]).all())
      assert r[5] == str(int(right))
      exact += right
    else:
      assert r[5] == "-"
  assert summary == {**summary, "puzzles": 4, "bad_lines": 3, "valid": valid, "with_solution": 2,
                     "exact": exact}
  assert f"4 puzzles (3 bad lines skipped): {valid} valid answers; {exact} of 2 with a solution" \
      in captured.out


@pytest.mark.slow
def test_solve_cli_refuses_what_it_cannot_solve(trained, tmp_path):
  import subprocess
  import sys
  from tests.experiments.smoke import ROOT, cli_env
  bad = tmp_path / "bad.txt"
  bad.write_text("123\n" + "55" + "." * 79 + "\n")
  run = lambda *a: subprocess.run([sys.executable, "-m", "relay_jax.solve", *a], cwd=ROOT,
                                  env=cli_env(), capture_output=True, text=True, timeout=300)
  r = run("--workdir", str(trained), "--puzzles", str(bad))
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == \
      f"error: no valid puzzle in {bad} (2 bad lines)"
  for args, expected in ((("--workdir", str(tmp_path / "nope"), "--puzzles", str(bad)),
                          "is not a run directory: it has no config.json"),
                         (("--workdir", str(trained), "--puzzles", str(tmp_path / "none.txt")),
                          "none.txt: no such file")):
    r = run(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], r.stderr


def test_paper_preset_is_the_published_sudoku_model():
  """d=384, 4 layers, 6 heads, FFN 1536: ~7.1M parameters (the paper's Sudoku model)."""
  config = relay_sudoku.get_config("paper")
  model = relay_task.build_model(config, relay_task.SUDOKU_VOCAB, relay_task.SUDOKU_MASK)
  shapes = jax.eval_shape(lambda k: model.init(k, jax.numpy.zeros((1, 81), jax.numpy.int32)),
                          jax.random.PRNGKey(0))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert 7.0e6 < count < 7.2e6, count
  assert config.train.global_batch_size == 512 and config.optim.lr == 5e-4
