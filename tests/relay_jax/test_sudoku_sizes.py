"""`relay_jax.sudoku` and the `sudoku` builder on 4x4 (2x2 boxes), 6x6 (2x3) and 9x9 grids, against
checks written independently of the module."""
import itertools

import numpy as np
import pytest

import core.data
from relay_jax import sudoku, sudoku_data

BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}   # (rows, columns), written out independently


def _units(n: int) -> list[list[int]]:
  br, bc = BOXES[n]
  rows = [[r * n + c for c in range(n)] for r in range(n)]
  columns = [[r * n + c for r in range(n)] for c in range(n)]
  boxes = [[(r0 + i) * n + c0 + j for i in range(br) for j in range(bc)]
           for r0 in range(0, n, br) for c0 in range(0, n, bc)]
  return rows + columns + boxes


def _valid(grid, n: int) -> bool:
  g = [int(v) for v in grid]
  return all(sorted(g[i] for i in unit) == list(range(1, n + 1)) for unit in _units(n))


def _brute_force(grid, n: int, limit: int = 2) -> list[list[int]]:
  """Up to `limit` solutions by plain backtracking over Python sets (first blank cell first)."""
  grid, units = [int(v) for v in grid], _units(n)
  peers = [set(itertools.chain.from_iterable(u for u in units if i in u)) - {i}
           for i in range(n * n)]
  solutions = []

  def search():
    blank = next((i for i, v in enumerate(grid) if v == 0), None)
    if blank is None:
      solutions.append(list(grid))
      return
    for d in set(range(1, n + 1)) - {grid[p] for p in peers[blank]}:
      grid[blank] = d
      search()
      grid[blank] = 0
      if len(solutions) >= limit:
        return

  search()
  return solutions


@pytest.mark.parametrize("n", [4, 6, 8, 9])
def test_box_shapes_and_units(n):
  rows, cols = sudoku.box_shape(n)
  assert rows * cols == n and 1 < rows <= cols
  g = sudoku.geometry(n)
  assert g.units_Uxn.shape == (3 * n, n)
  # Every cell lies in exactly one row, one column and one box.
  for kind in range(3):
    np.testing.assert_array_equal(np.sort(g.units_Uxn[kind * n:(kind + 1) * n].ravel()),
                                  np.arange(n * n))
  if n in BOXES:
    assert sorted(map(sorted, g.units_Uxn.tolist())) == sorted(map(sorted, _units(n)))


@pytest.mark.parametrize("n", [5, 7, 10, 16])
def test_unsupported_sizes_are_named(n):
  with pytest.raises(ValueError, match=f"grid size must be one of .*, got {n}"):
    sudoku.box_shape(n)


@pytest.mark.parametrize("n", [4, 6, 9])
def test_random_solutions_are_valid_and_varied(n, rng):
  grids = sudoku.random_solutions(rng, 30, size=n)
  assert grids.shape == (30, n * n) and grids.dtype == np.int8
  assert all(_valid(g, n) for g in grids)
  np.testing.assert_array_equal(sudoku.valid_solutions(grids), True)
  assert len({g.tobytes() for g in grids}) > 10
  broken = grids.copy()
  broken[:, [0, 1]] = broken[:, [1, 0]]           # two cells of a row swapped: columns repeat
  assert not sudoku.valid_solutions(broken).any()


@pytest.mark.parametrize("n", [4, 6])
def test_solver_matches_brute_force(n, rng):
  grids = sudoku.random_solutions(rng, 40, size=n)
  puzzles = (grids * (rng.random(grids.shape) < rng.uniform(0.1, 0.5, (40, 1)))).astype(np.int8)
  count, solution, _ = sudoku.solve_batch(puzzles)
  for p, c, s in zip(puzzles, count, solution):
    expected = _brute_force(p, n)
    assert c == len(expected)
    if c == 1:
      assert s.tolist() == expected[0]


@pytest.mark.parametrize("n", [4, 6])
def test_generated_puzzles_are_unique_and_minimal(n, seed):
  puzzles, solutions, backtracks = sudoku.generate(np.random.default_rng(seed), 12, size=n)
  assert puzzles.shape == solutions.shape == (12, n * n) and backtracks.shape == (12,)
  for p, s in zip(puzzles, solutions):
    assert _valid(s, n) and np.all((p == 0) | (p == s))
    assert _brute_force(p, n) == [s.tolist()]
    for cell in np.flatnonzero(p):                 # minimal: every clue is needed
      fewer = p.copy()
      fewer[cell] = 0
      assert len(_brute_force(fewer, n)) == 2


def _symmetries(grid_nxn: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
  """Generators of the symmetry group applied alone, written independently of `augment`."""
  n = len(grid_nxn)
  br, bc = BOXES[n]
  swap_rows = np.arange(n)
  swap_rows[[0, br - 1]] = [br - 1, 0]             # two rows of the first band
  swap_cols = np.arange(n)
  swap_cols[[0, bc - 1]] = [bc - 1, 0]             # two columns of the first stack
  bands = np.roll(np.arange(n), br)                # the bands rotated
  stacks = np.roll(np.arange(n), bc)
  label = np.r_[0, rng.permutation(n) + 1]
  out = [grid_nxn[swap_rows], grid_nxn[:, swap_cols], grid_nxn[bands], grid_nxn[:, stacks],
         label[grid_nxn]]
  return out + ([grid_nxn.T] if br == bc else [])


@pytest.mark.parametrize("n", [4, 6])
def test_symmetries_keep_grids_valid_and_keys_equal(n, rng):
  puzzles, solutions, _ = sudoku.generate(rng, 6, size=n)
  for grid in np.concatenate([puzzles, solutions]):
    key = sudoku.canonical_key(grid)
    for image in _symmetries(grid.reshape(n, n), rng):
      assert sudoku.canonical_key(image.ravel()) == key
  a_p, a_s = sudoku.augment(rng, np.repeat(puzzles, 8, 0), np.repeat(solutions, 8, 0))
  assert all(_valid(s, n) for s in a_s)
  assert np.all((a_p == 0) | (a_p == a_s))
  np.testing.assert_array_equal(sudoku.solve_batch(a_p)[1], a_s)
  np.testing.assert_array_equal(sudoku.canonical_keys(a_p), np.repeat(sudoku.canonical_keys(puzzles), 8))
  assert len({g.tobytes() for g in a_s}) > 8


def test_6x6_transpose_is_no_symmetry(rng):
  # 2x3 boxes become 3x2 ones: a transposed 6x6 solution is (almost always) not a valid grid.
  grids = sudoku.random_solutions(rng, 20, size=6)
  transposed = grids.reshape(20, 6, 6).transpose(0, 2, 1).reshape(20, 36)
  assert np.mean([_valid(g, 6) for g in transposed]) < 0.5


@pytest.mark.parametrize("n", [4, 6])
def test_parse_and_errors_per_size(n, rng):
  grid = sudoku.random_solutions(rng, 1, size=n)[0] * (rng.random(n * n) < 0.5)
  text = sudoku.format_grid(grid)
  assert len(text) == n * n
  np.testing.assert_array_equal(sudoku.parse_puzzle(text), grid)
  np.testing.assert_array_equal(sudoku.parse_puzzle(text.replace(".", "0"), n), grid)
  with pytest.raises(ValueError, match=rf"bad character '{n + 1}' at position 1 .*use 1-{n}"):
    sudoku.parse_puzzle(str(n + 1) + text[1:])
  with pytest.raises(ValueError, match=f"a 9x9 puzzle has 81 characters, got {n * n}"):
    sudoku.parse_puzzle(text, 9)


@pytest.mark.parametrize("name, n", [("tiny6", 6), ("tiny4", 4)])
def test_small_builders(name, n, tmp_path):
  splits = {s: core.data.load_in_memory("sudoku", s, config=name, data_dir=str(tmp_path)).arrays
            for s in ("train", "test")}
  assert sudoku_data.grid_size(name) == n
  config = {c.name: c for c in sudoku_data.Sudoku.BUILDER_CONFIGS}[name]
  for split, count in (("train", config.num_train), ("test", config.num_test)):
    arrays = splits[split]
    assert arrays["puzzle"].shape == arrays["solution"].shape == (count, n * n)
    found_count, found, _ = sudoku.solve_batch(arrays["puzzle"])
    np.testing.assert_array_equal(found_count, 1)
    np.testing.assert_array_equal(found, arrays["solution"])
  if config.disjoint:
    train_keys = sudoku.canonical_keys(splits["train"]["puzzle"])
    assert not np.isin(sudoku.canonical_keys(splits["test"]["puzzle"]), train_keys).any()
