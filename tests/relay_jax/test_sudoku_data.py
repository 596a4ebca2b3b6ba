"""`relay_jax.sudoku_data`: the `sudoku` builder, its split, the transform, puzzle files."""
import numpy as np
import pytest

import core.data
from core.data import registry
from relay_jax import sudoku
from relay_jax import sudoku_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The `tiny` config built into a fresh data_dir: {split: InMemorySource}."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  return {split: core.data.load_in_memory("sudoku", split, config="tiny", data_dir=data_dir)
          for split in ("train", "test")}


def test_registered_under_its_tfds_name():
  assert registry.BUILDERS["sudoku"] is sudoku_data.Sudoku
  assert core.data.config_names("sudoku") == ["small", "graded", "large", "tiny", "small6", "tiny6",
                                               "tiny4"]
  registry.register_builder("sudoku", sudoku_data.Sudoku)  # Again: a no-op.
  with pytest.raises(ValueError, match="already registered as Sudoku"):
    registry.register_builder("sudoku", registry.BUILDERS["digits"])
  with pytest.raises(ValueError, match="named 'sudoku' by tfds, not 'sudoku9'"):
    registry.register_builder("sudoku9", sudoku_data.Sudoku)
  assert "sudoku9" not in registry.BUILDERS


def test_tiny_config_features_and_sizes(tiny):
  config = {c.name: c for c in sudoku_data.Sudoku.BUILDER_CONFIGS}["tiny"]
  for split, n in (("train", config.num_train), ("test", config.num_test)):
    arrays = tiny[split].arrays
    assert set(arrays) == {"puzzle", "solution", "backtracks", "clues"}
    assert arrays["puzzle"].shape == arrays["solution"].shape == (n, 81)
    assert arrays["puzzle"].dtype == arrays["solution"].dtype == np.int8
    assert arrays["backtracks"].shape == arrays["clues"].shape == (n,)
    assert arrays["backtracks"].dtype == arrays["clues"].dtype == np.int32
    np.testing.assert_array_equal(arrays["clues"], (arrays["puzzle"] != 0).sum(1))
    assert (arrays["backtracks"] > 0).sum() == round(config.hard_share * n)


def test_tiny_puzzles_are_unique_and_rated(tiny):
  arrays = tiny["test"].arrays
  count_N, solution_Nx81, backtracks_N = sudoku.solve_batch(arrays["puzzle"])
  assert np.all(count_N == 1)
  np.testing.assert_array_equal(solution_Nx81, arrays["solution"])
  np.testing.assert_array_equal(backtracks_N, arrays["backtracks"])


def test_tiny_splits_share_no_grid_up_to_symmetry(tiny):
  train_key = sudoku.canonical_keys(tiny["train"].arrays["solution"])
  test_key = sudoku.canonical_keys(tiny["test"].arrays["solution"])
  assert not np.isin(test_key, train_key).any()
  assert not sudoku_data.shared_with(tiny["test"].arrays["solution"], train_key).any()


def test_shared_with_finds_symmetry_images_of_train_grids(rng):
  train_Nx81 = sudoku.random_solutions(rng, 40)
  image_Nx81 = sudoku.augment(rng, train_Nx81, train_Nx81)[1]
  candidates_Mx81 = np.concatenate([image_Nx81[:10], sudoku.random_solutions(rng, 30)])
  shared_M = sudoku_data.shared_with(candidates_Mx81, sudoku.canonical_keys(train_Nx81))
  np.testing.assert_array_equal(shared_M, np.arange(40) < 10)


def test_generate_disjoint_replaces_shared_puzzles(seed):
  puzzle_Nx81, solution_Nx81, _ = sudoku.generate(np.random.default_rng(seed), 8)
  # The same seed draws the same 8 puzzles first; 3 of them are "in train" and must be replaced.
  train_key = sudoku.canonical_keys(solution_Nx81[:3])
  new_puzzle, new_solution, new_backtracks = sudoku_data.generate_disjoint(
      np.random.default_rng(seed), 8, train_key)
  assert new_puzzle.shape == new_solution.shape == (8, 81) and new_backtracks.shape == (8,)
  assert not np.isin(sudoku.canonical_keys(new_solution), train_key).any()
  kept = {sudoku.format_grid(p) for p in new_puzzle}
  assert {sudoku.format_grid(p) for p in puzzle_Nx81[3:]} <= kept
  assert np.all(sudoku.solve_batch(new_puzzle)[0] == 1)


def test_random_symmetry_per_example_and_per_batch(tiny, rng):
  source = tiny["train"]
  iterator = lambda: core.data.BatchIterator(source, global_batch_size=16, seed=3,
                                             transform=sudoku_data.random_symmetry)
  first, again = next(iterator()), next(iterator())
  plain = next(core.data.BatchIterator(source, global_batch_size=16, seed=3))
  for batch in (first, sudoku_data.random_symmetry(plain, rng)):
    assert batch["puzzle"].shape == (16, 81) and batch["puzzle"].dtype == np.int8
    assert sudoku.valid_solutions(batch["solution"]).all()
    assert np.all((batch["puzzle"] == 0) | (batch["puzzle"] == batch["solution"]))
    np.testing.assert_array_equal(batch["clues"], plain["clues"])
    np.testing.assert_array_equal(batch["clues"], (batch["puzzle"] != 0).sum(1))
    assert np.all((batch["puzzle"] != plain["puzzle"]).any(1))
    np.testing.assert_array_equal(sudoku.canonical_keys(batch["solution"]),
                                  sudoku.canonical_keys(plain["solution"]))
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])


def test_read_puzzle_file_reports_bad_lines_by_number(tmp_path, rng):
  solution_81 = sudoku.random_solutions(rng, 1)[0]
  puzzle_81 = solution_81 * (rng.random(81) < 0.4)
  cell = rng.integers(81)
  puzzle_81[cell] = solution_81[cell]                      # at least one clue (used below)
  puzzle, solution = sudoku.format_grid(puzzle_81), sudoku.format_grid(solution_81)
  # A valid grid that disagrees with a clue: two digits swapped everywhere.
  a = int(puzzle_81[np.flatnonzero(puzzle_81)[0]])
  swap_10 = np.arange(10, dtype=np.int8)
  swap_10[[a, a % 9 + 1]] = [a % 9 + 1, a]
  wrong = swap_10[solution_81]
  lines = [
      "# a comment",
      puzzle,
      "",
      f"{puzzle}\t{solution}",
      puzzle[:80],
      puzzle[:7] + "x" + puzzle[8:],
      "55" + "." * 79,
      f"{puzzle}\t{solution}\textra",
      f"{puzzle}\t{solution[:80]}",
      f"{puzzle}\t{sudoku.format_grid(wrong)}",
      f"{puzzle}\t" + "." * 81,
      f"  {puzzle.replace('.', '0')}  ",
  ]
  path = tmp_path / "puzzles.txt"
  path.write_text("\n".join(lines) + "\n")
  records = list(sudoku_data.read_puzzle_file(path))
  assert [r.number for r in records] == [2, 4, 5, 6, 7, 8, 9, 10, 11, 12]
  good = {r.number: (r.puzzle, r.solution) for r in records if not isinstance(r.puzzle, ValueError)}
  assert sorted(good) == [2, 4, 8, 12]           # line 8: a third column (a rating) is ignored
  for number in good:
    np.testing.assert_array_equal(good[number][0], puzzle_81)
  assert good[2][1] is None and good[12][1] is None
  np.testing.assert_array_equal(good[4][1], solution_81)
  np.testing.assert_array_equal(good[8][1], solution_81)
  assert [r.ignored_columns for r in records if r.number in (4, 8)] == [0, 1]
  errors = {r.number: str(r.puzzle) for r in records if isinstance(r.puzzle, ValueError)}
  assert all(r.solution is None for r in records if r.number in errors)
  assert "a puzzle has 16, 36, 64, 81 characters (n x n, n in (4, 6, 8, 9)), got 80" in errors[5]
  assert "'x' at position 8 (row 1, column 8)" in errors[6]
  assert errors[7] == "contradicting clues: digit 5 twice in row 1"
  assert errors[9] == "solution: a 9x9 puzzle has 81 characters, got 80"
  assert "where the puzzle's clue is" in errors[10]
  assert errors[11] == "solution: not a complete valid grid"


def test_add_clues_keeps_a_unique_consistent_solution(rng):
  puzzle, solution, _ = sudoku.generate(rng, 20)
  more, same, backtracks = sudoku_data.add_clues(rng, puzzle, solution, 30)
  np.testing.assert_array_equal(same, solution)
  assert ((more != 0) & (more != solution)).sum() == 0                 # clues agree with the solution
  assert ((puzzle != 0) & (more != puzzle)).sum() == 0                 # old clues kept
  extra = (more != 0).sum(1) - (puzzle != 0).sum(1)
  assert extra.min() >= 0 and extra.max() <= 30 and extra.std() > 0
  count, found, rated = sudoku.solve_batch(more)
  assert (count == 1).all() and (found == solution).all()
  np.testing.assert_array_equal(rated, backtracks)
