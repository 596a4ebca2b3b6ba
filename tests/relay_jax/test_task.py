"""The relay tasks through the trainer: a sharded step with the rollout buffer, and the solve CLI."""
import functools
import pathlib

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
def trained(tmp_path_factory, smoke_runs):
  """A copy of the session's shared relay_sudoku.py:smoke run (trained once, through the CLI)."""
  return pathlib.Path(smoke_runs.copy("relay_sudoku_relay_s0", tmp_path_factory.mktemp("relay_smoke")))


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
def test_solve_cli_on_a_6x6_run(tmp_path):
  config = relay_sudoku.get_config("smoke")
  config.data.config = "tiny6"
  config.train.update({"num_steps": 2, "eval_every": 0, "checkpoint_every": 2})
  train.train(config, str(tmp_path / "run"))
  test = data.load_in_memory("sudoku", "test", config="tiny6").arrays
  lines = [sudoku.format_grid(test["puzzle"][k]) + "\t" + sudoku.format_grid(test["solution"][k])
           for k in range(5)] + ["." * 81, "7" + "." * 35]
  path = tmp_path / "six.txt"
  path.write_text("\n".join(lines) + "\n")
  summary = solve.main(["--workdir", str(tmp_path / "run"), "--puzzles", str(path)])
  assert summary == {**summary, "puzzles": 5, "bad_lines": 2, "with_solution": 5}
  rows = [l.split("\t") for l in (tmp_path / "six.txt.solved").read_text().splitlines()[1:]]
  for r, puzzle, solution in zip(rows, test["puzzle"], test["solution"]):
    assert len(r[2]) == 36 and set(r[2]) <= set("123456")   # every cell filled with a digit 1-6
    answer = np.array([int(c) for c in r[2]])
    assert np.all(answer[puzzle != 0] == puzzle[puzzle != 0])
    assert r[5] == str(int(np.array_equal(answer, solution)))


@pytest.mark.slow
def test_solve_cli_refuses_what_it_cannot_solve(trained, tmp_path):
  import subprocess
  import sys
  from tests.experiments.smoke import ROOT, cli_env
  bad = tmp_path / "bad.txt"
  six = sudoku.format_grid(data.load_in_memory("sudoku", "test", config="tiny6").arrays["puzzle"][0])
  bad.write_text("123\n" + "55" + "." * 79 + "\n" + six + "\n")     # a 6x6 puzzle for a 9x9 run
  run = lambda *a: subprocess.run([sys.executable, "-m", "relay_jax.solve", *a], cwd=ROOT,
                                  env=cli_env(), capture_output=True, text=True, timeout=300)
  r = run("--workdir", str(trained), "--puzzles", str(bad))
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == \
      f"error: no valid puzzle in {bad} (3 bad lines)"
  assert f"bad.txt:3: skipped: a 9x9 puzzle has 81 characters, got 36" in r.stderr
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
  model = relay_task.sudoku_model(config)
  shapes = jax.eval_shape(lambda k: model.init(k, jax.numpy.zeros((1, 81), jax.numpy.int32)),
                          jax.random.PRNGKey(0))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert 7.0e6 < count < 7.2e6, count
  assert config.train.global_batch_size == 512 and config.optim.lr == 5e-4


def test_sudoku_metrics_blank_accuracy_and_authors_nfe(rng):
  """blank_accuracy and the authors' NFE against per-puzzle loops: each puzzle counts the slowest
  rounds of its evaluation batch (consecutive chunks, the last one partial) + 1, so the mean is the
  batches' max + 1 weighted by their sizes."""
  n = int(rng.integers(1, 40))
  solutions = rng.integers(1, 10, (n, 81))
  grids = np.where(rng.uniform(size=(n, 81)) < rng.uniform(0, 0.6), rng.integers(1, 10, (n, 81)),
                   solutions)
  puzzles = np.where(rng.uniform(size=(n, 81)) < 0.6, relay_task.SUDOKU_MASK, solutions)
  puzzles[0, 0] = relay_task.SUDOKU_MASK
  nfe = rng.integers(1, 20, n)
  batch_size = int(rng.integers(1, n + 4))
  blank = [(grids[i, c] == solutions[i, c]) for i in range(n) for c in range(81)
           if puzzles[i, c] == relay_task.SUDOKU_MASK]
  authors = [max(nfe[j] for j in range(n) if j // batch_size == i // batch_size) + 1
             for i in range(n)]
  np.testing.assert_array_equal(relay_task.authors_nfe(nfe, batch_size), authors)
  weighted = sum(len(nfe[i:i + batch_size]) * (nfe[i:i + batch_size].max() + 1)
                 for i in range(0, n, batch_size)) / n
  m = relay_task.sudoku_metrics(grids, solutions, nfe, puzzles, batch_size=batch_size)
  np.testing.assert_allclose(m["blank_accuracy"], np.mean(blank), rtol=1e-12)
  np.testing.assert_allclose(m["nfe_authors"], weighted, rtol=1e-12)
  np.testing.assert_allclose(m["nfe"], nfe.mean(), rtol=1e-12)
  np.testing.assert_allclose(m["cell_accuracy"], (grids == solutions).mean(), rtol=1e-12)
  assert m["exact_match"] == (grids == solutions).all(1).mean()
  plain = relay_task.sudoku_metrics(grids, solutions, nfe)
  assert not {"blank_accuracy", "nfe_authors"} & set(plain)


def test_relay_config_choices_are_checked_and_reach_the_objectives(monkeypatch):
  """The authors' settings are the defaults; bad values are refused by name; make_loss hands each
  objective its setting."""
  from experiments.configs import relay_code
  for module in (relay_sudoku, relay_code):
    config = module.get_config("paper")
    assert (config.relay.mlm_weighting, config.relay.tau_jitter) == ("unweighted", "batch")
    assert config.optim.ema_warmup
    relay_task.check_config(config)
    for field in ("mlm_weighting", "tau_jitter"):
      bad = module.get_config("paper")
      bad.relay[field] = "nope"
      with pytest.raises(ValueError, match=f"config.relay.{field}='nope'"):
        relay_task.check_config(bad)
  seen = {}

  def recorder(result):
    def objective(*args, **kwargs):
      seen.update(kwargs)
      return result
    return objective
  monkeypatch.setattr(relay_task.objectives, "mlm_loss", recorder((0.0, {})))
  monkeypatch.setattr(relay_task.objectives, "rollout_loss", recorder((0.0, {}, None)))
  for objective, field, argument, value in (("mlm", "mlm_weighting", "weighting", "mdlm"),
                                            ("relay", "tau_jitter", "tau_jitter", "row")):
    config = relay_sudoku.get_config("smoke")
    config.relay.objective = objective
    config.relay[field] = value
    loss, _ = relay_task.make_loss(config, None, relay_task.SUDOKU_MASK, 81)
    loss(None, {"x0": None, "maskable": None}, None, None)
    assert seen[argument] == value
