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
  lines = [sudoku.format_grid(test["puzzle"][0]),
           sudoku.format_grid(test["puzzle"][1]) + "\t" + sudoku.format_grid(test["solution"][1]),
           "123",                                                  # too short
           "55" + "." * 79,                                        # contradicting clues
           "a" + "." * 80,                                         # bad character
           sudoku.format_grid(test["puzzle"][2]).replace(".", "0")]
  path = tmp_path / "puzzles.txt"
  path.write_text("\n".join(lines) + "\n")
  summary = solve.main(["--workdir", str(trained), "--puzzles", str(path)])
  err = capsys.readouterr().err
  for number in (3, 4, 5):
    assert f"puzzles.txt:{number}: skipped" in err
  assert summary["solved"] == 3 and summary["bad_lines"] == 3 and summary["with_solution"] == 1
  out = (tmp_path / "puzzles.txt.solved").read_text().splitlines()
  assert [int(l.split("\t")[0]) for l in out] == [1, 2, 6]
  for line, puzzle in zip(out, (test["puzzle"][0], test["puzzle"][1], test["puzzle"][2])):
    grid = sudoku.parse_puzzle(line.split("\t")[1].replace(".", "0")) if "." in line else \
        np.array([int(c) for c in line.split("\t")[1]])
    assert (grid[puzzle != 0] == puzzle[puzzle != 0]).all()      # clues kept
    assert (grid != 0).all() and 1 <= int(line.split("\t")[2]) <= 8   # complete, NFE within the cap


def test_paper_preset_is_the_published_sudoku_model():
  """d=384, 4 layers, 6 heads, FFN 1536: ~7.1M parameters (the paper's Sudoku model)."""
  config = relay_sudoku.get_config("paper")
  model = relay_task.build_model(config, relay_task.SUDOKU_VOCAB, relay_task.SUDOKU_MASK)
  shapes = jax.eval_shape(lambda k: model.init(k, jax.numpy.zeros((1, 81), jax.numpy.int32)),
                          jax.random.PRNGKey(0))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert 7.0e6 < count < 7.2e6, count
  assert config.train.global_batch_size == 512 and config.optim.lr == 5e-4
