"""`relay_jax.sudoku`: parsing, the solver against an independent one, the generator, symmetries."""
import zlib

import numpy as np
import pytest

from relay_jax import sudoku

# Arto Inkala's "world's hardest sudoku" and its published solution.
INKALA = "8..........36......7..9.2...5...7.......457.....1...3...1....68..85...1..9....4.."
INKALA_SOLUTION = ("812753649943682175675491283154237896369845721"
                   "287169534521974368438526917796318452")


def _valid(grid_81) -> bool:
  """Independent of the module: every row, column and box is exactly {1..9}."""
  g = np.asarray(grid_81).reshape(9, 9)
  units = [*g, *g.T, *(g[r:r + 3, c:c + 3].ravel() for r in (0, 3, 6) for c in (0, 3, 6))]
  return all(sorted(unit) == list(range(1, 10)) for unit in units)


def _brute_force(grid_81, limit=2) -> list[list[int]]:
  """Up to `limit` solutions by plain backtracking over Python sets (fewest options first)."""
  grid = [int(v) for v in grid_81]
  used = [set() for _ in range(27)]  # rows, columns, boxes
  units = lambda i: (i // 9, 9 + i % 9, 18 + 3 * (i // 27) + (i % 9) // 3)
  for i, v in enumerate(grid):
    for u in units(i):
      used[u].add(v)
  solutions = []

  def search():
    best, best_options = None, None
    for i, v in enumerate(grid):
      if v == 0:
        options = set(range(1, 10)).difference(*(used[u] for u in units(i)))
        if best is None or len(options) < len(best_options):
          best, best_options = i, options
    if best is None:
      solutions.append(list(grid))
      return
    for d in sorted(best_options):
      grid[best] = d
      for u in units(best):
        used[u].add(d)
      search()
      for u in units(best):
        used[u].discard(d)
      grid[best] = 0
      if len(solutions) >= limit:
        return

  search()
  return solutions


_GENERATED = {}


@pytest.fixture
def generated(suite_seed, seed):
  """Fresh puzzles: (puzzles [24, 81], solutions [24, 81], backtracks [24]), half hard.

  Generated once per suite seed (it takes seconds) and shared by the tests that use it; it asks for
  `seed` only so that those tests count as randomized (run under --seeds, replay command shown).
  """
  del seed
  if suite_seed not in _GENERATED:
    rng = np.random.default_rng([suite_seed, zlib.crc32(b"test_sudoku.generated")])
    _GENERATED[suite_seed] = sudoku.generate(rng, 24, hard_share=0.5)
  return _GENERATED[suite_seed]


# Parsing and validity.

def test_parse_and_format_round_trip(rng):
  grid_81 = sudoku.random_solutions(rng, 1)[0] * (rng.random(81) < 0.4)
  text = sudoku.format_grid(grid_81)
  assert len(text) == 81 and set(text) <= set(".123456789")
  np.testing.assert_array_equal(sudoku.parse_puzzle(text), grid_81)
  np.testing.assert_array_equal(sudoku.parse_puzzle(text.replace(".", "0")), grid_81)
  assert sudoku.parse_puzzle(text).dtype == np.int8


@pytest.mark.parametrize("length", [0, 15, 25, 49, 80, 82])
def test_parse_rejects_wrong_length(length):
  expected = rf"a puzzle has 16, 36, 64, 81 characters \(n x n, n in \(4, 6, 8, 9\)\), got {length}$"
  with pytest.raises(ValueError, match=expected):
    sudoku.parse_puzzle("." * length)


def test_parse_names_a_bad_character_and_where_it_is(rng):
  i = int(rng.integers(81))
  with pytest.raises(ValueError, match=rf"'x' at position {i + 1} \(row {i // 9 + 1}, column "
                                       rf"{i % 9 + 1}\)"):
    sudoku.parse_puzzle("." * i + "x" + "." * (80 - i))


@pytest.mark.parametrize("unit", ["row", "column", "box"])
def test_parse_names_contradicting_clues(unit, rng):
  digit, k = (int(v) for v in rng.integers(1, 10, 2))
  k -= 1
  first, second = {"row": ((k, 0), (k, 8)), "column": ((0, k), (8, k)),
                   "box": ((3 * (k // 3), 3 * (k % 3)), (3 * (k // 3) + 2, 3 * (k % 3) + 1))}[unit]
  grid_9x9 = np.zeros((9, 9), np.int8)
  grid_9x9[first] = grid_9x9[second] = digit
  with pytest.raises(ValueError, match=f"digit {digit} twice in {unit} {k + 1}$"):
    sudoku.parse_puzzle(sudoku.format_grid(grid_9x9))


def test_valid_solutions_agree_with_an_independent_check(rng):
  grid_Bx81 = sudoku.random_solutions(rng, 12)
  broken = grid_Bx81.copy()
  broken[0, [0, 1]] = broken[0, [1, 0]]  # Swapped within a row: columns now repeat.
  broken[1, rng.integers(81)] = 0  # Incomplete.
  broken[2, 40] = broken[2, 40] % 9 + 1
  broken[3, 40] = 10  # e.g. a model's mask token
  latin_9x9 = (np.arange(9)[:, None] + np.arange(9)[None] + rng.integers(9)) % 9 + 1
  broken[4] = latin_9x9.ravel()  # Rows and columns hold 1..9, boxes do not.
  every_Bx81 = np.concatenate([grid_Bx81, broken[:5]]).astype(np.int32)
  expected = [_valid(g) for g in every_Bx81]
  assert expected == [True] * 12 + [False] * 5
  np.testing.assert_array_equal(sudoku.valid_solutions(every_Bx81), expected)
  assert [sudoku.is_valid_solution(g) for g in every_Bx81] == expected


# The solver.

def test_solves_the_hardest_known_puzzle():
  count, solution, backtracks = sudoku.solve(sudoku.parse_puzzle(INKALA))
  assert count == 1 and sudoku.format_grid(solution) == INKALA_SOLUTION
  assert backtracks > 0  # Singles alone do not solve it.


def test_counts_agree_with_brute_force_on_puzzles_with_few_blanks(rng):
  grid_Bx81 = sudoku.random_solutions(rng, 40)
  assert all(_valid(g) for g in grid_Bx81)
  # 30-60% blanks: about half of these puzzles have one solution, half several (54% unique of
  # 20000 drawn so), so all 40 alike has probability ~2e-11.
  puzzle_Bx81 = grid_Bx81 * (rng.random((40, 81)) > rng.uniform(0.3, 0.6, (40, 1)))
  count_B, solution_Bx81, _ = sudoku.solve_batch(puzzle_Bx81)
  assert 0 < (count_B == 1).sum() < 40
  for puzzle, count, solution in zip(puzzle_Bx81, count_B, solution_Bx81):
    expected = _brute_force(puzzle)
    assert count == len(expected)
    assert _valid(solution) and np.all((puzzle == 0) | (puzzle == solution))
    if count == 1:
      assert expected == [solution.tolist()]


def test_solutions_are_valid_and_keep_the_clues_on_many_puzzles(rng):
  grid_Bx81 = sudoku.random_solutions(rng, 400)
  # 24-52 blanks (29-57 clues), exactly. With 15-25 random clues the search has a heavy tail: 2 in
  # 100 draws of 400 puzzles with 20-70% clues held one that took ~15000 dead ends (~10 s) to find
  # a second solution; of 400000 puzzles with 29 or more clues none took more than 15.
  blank_Bx81 = rng.random((400, 81)).argsort(1) < rng.integers(24, 53, (400, 1))
  puzzle_Bx81 = np.where(blank_Bx81, 0, grid_Bx81)
  count_B, solution_Bx81, _ = sudoku.solve_batch(puzzle_Bx81)
  assert np.all(count_B >= 1)  # The grid each came from solves it.
  assert all(_valid(s) for s in solution_Bx81)
  assert np.all((puzzle_Bx81 == 0) | (puzzle_Bx81 == solution_Bx81))


def test_two_solutions_when_blanks_cover_a_swap_of_rows(rng):
  grid_9x9 = sudoku.random_solutions(rng, 1)[0].reshape(9, 9)
  band, (r1, r2) = rng.integers(3), rng.choice(3, 2, replace=False)
  other_9x9 = grid_9x9.copy()
  other_9x9[[3 * band + r1, 3 * band + r2]] = other_9x9[[3 * band + r2, 3 * band + r1]]
  # Both grids are solutions of the puzzle that blanks the cells where they differ.
  puzzle_81 = np.where(grid_9x9 == other_9x9, grid_9x9, 0).ravel()
  assert len(_brute_force(puzzle_81)) == 2
  count, solution, _ = sudoku.solve(puzzle_81)
  assert count == 2 and _valid(solution)  # Maybe neither grid: the rows may mix in other ways.
  assert np.all((puzzle_81 == 0) | (puzzle_81 == solution))


def test_nearly_empty_puzzle_has_many_solutions_and_limit_caps_the_count(rng):
  puzzle_81 = np.zeros(81, np.int8)
  puzzle_81[rng.choice(81, 4, replace=False)] = [1, 2, 3, 4]
  count, solution, _ = sudoku.solve(puzzle_81)
  assert count == 2 and _valid(solution)
  assert np.all((puzzle_81 == 0) | (puzzle_81 == solution))
  assert sudoku.solve(puzzle_81, limit=1)[0] == 1
  assert sudoku.solve(puzzle_81, limit=5)[0] == 5


def test_no_solution_is_a_dead_end():
  puzzle_9x9 = np.zeros((9, 9), np.int8)
  puzzle_9x9[0, :8] = np.arange(1, 9)
  puzzle_9x9[5, 8] = 9  # Cell (0, 8) can only be 9, which its column already has.
  count, solution, backtracks = sudoku.solve(puzzle_9x9.ravel())
  assert (count, solution) == (0, None) and backtracks >= 1


# The generator.

def test_generated_puzzles_have_one_solution_consistent_with_their_clues(generated):
  puzzle_Nx81, solution_Nx81, backtracks_N = generated
  assert puzzle_Nx81.shape == solution_Nx81.shape == (24, 81)
  assert puzzle_Nx81.dtype == solution_Nx81.dtype == np.int8 and backtracks_N.dtype == np.int32
  assert all(_valid(s) for s in solution_Nx81)
  assert np.all((puzzle_Nx81 == 0) | (puzzle_Nx81 == solution_Nx81))
  count_N, found_Nx81, rated_N = sudoku.solve_batch(puzzle_Nx81)
  assert np.all(count_N == 1)
  np.testing.assert_array_equal(found_Nx81, solution_Nx81)
  np.testing.assert_array_equal(rated_N, backtracks_N)
  assert (backtracks_N > 0).sum() == 12  # hard_share=0.5
  assert len({sudoku.format_grid(s) for s in solution_Nx81}) == 24  # Each from its own grid.
  # Independently: the brute force finds exactly the stored solution.
  for puzzle, solution in zip(puzzle_Nx81[:3], solution_Nx81[:3]):
    assert _brute_force(puzzle) == [solution.tolist()]


def test_generated_puzzles_are_minimal(generated):
  puzzle_81 = generated[0][0]
  clue_c = np.flatnonzero(puzzle_81)
  assert 17 <= len(clue_c) <= 35
  fewer_cx81 = np.repeat(puzzle_81[None], len(clue_c), axis=0)
  fewer_cx81[np.arange(len(clue_c)), clue_c] = 0
  assert np.all(sudoku.solve_batch(fewer_cx81)[0] == 2)
  assert len(_brute_force(fewer_cx81[0])) == 2


def test_generate_is_a_function_of_the_rng(seed):
  run = lambda: sudoku.generate(np.random.default_rng(seed), 6, hard_share=0.5, batch_size=4)
  for a, b in zip(run(), run()):
    np.testing.assert_array_equal(a, b)


# Symmetries.

def test_augment_keeps_grids_valid_and_consistent_and_changes_them(generated, rng):
  puzzle_Nx81, solution_Nx81, _ = generated
  puzzle_Ax81, solution_Ax81 = sudoku.augment(rng, puzzle_Nx81, solution_Nx81)
  assert puzzle_Ax81.dtype == solution_Ax81.dtype == np.int8
  assert all(_valid(s) for s in solution_Ax81)
  assert np.all((puzzle_Ax81 == 0) | (puzzle_Ax81 == solution_Ax81))
  np.testing.assert_array_equal((puzzle_Ax81 == 0).sum(1), (puzzle_Nx81 == 0).sum(1))
  count_N, found_Nx81, _ = sudoku.solve_batch(puzzle_Ax81)
  assert np.all(count_N == 1)
  np.testing.assert_array_equal(found_Nx81, solution_Ax81)
  assert np.all((puzzle_Ax81 != puzzle_Nx81).any(1))
  assert np.all((solution_Ax81 != solution_Nx81).any(1))


def test_augment_is_a_function_of_the_rng_and_applies_one_symmetry_per_row(seed):
  grid_Bx81 = np.repeat(sudoku.random_solutions(np.random.default_rng(seed), 1), 64, axis=0)
  a = sudoku.augment(np.random.default_rng(seed), grid_Bx81, grid_Bx81)
  b = sudoku.augment(np.random.default_rng(seed), grid_Bx81, grid_Bx81)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[0], a[1])  # The same symmetry for puzzle and solution.
  assert len({sudoku.format_grid(g) for g in a[0]}) == 64  # Rows get their own symmetries.


def test_augment_moves_a_row_or_column_to_any_line_and_transposes(rng):
  solution_Bx81 = np.repeat(sudoku.random_solutions(rng, 1), 128, axis=0)
  # Rows 0-63: clues in row 1 only; rows 64-127: clues in column 1 only.
  cell_81 = np.arange(81)
  clue_Bx81 = np.where(np.arange(128)[:, None] < 64, cell_81 < 9, cell_81 % 9 == 0)
  puzzle_Bx81 = solution_Bx81 * clue_Bx81
  puzzle_Bx81, solution_Bx81 = sudoku.augment(rng, puzzle_Bx81, solution_Bx81)
  assert np.all((puzzle_Bx81 == 0) | (puzzle_Bx81 == solution_Bx81))
  row_Bx9, column_Bx9 = np.divmod(np.nonzero(puzzle_Bx81)[1].reshape(128, 9), 9)
  in_a_row_B = (row_Bx9 == row_Bx9[:, :1]).all(1)
  in_a_column_B = (column_Bx9 == column_Bx9[:, :1]).all(1)
  assert np.all(in_a_row_B ^ in_a_column_B)
  assert 0 < in_a_row_B[:64].sum() < 64  # Transposed about half the time.
  # Where the line lands: row moves (bands, rows in a band) for the first half, column moves for
  # the second; a transpose turns either into the other kind of line but keeps its index.
  line_B = np.where(in_a_row_B, row_Bx9[:, 0], column_Bx9[:, 0])
  assert len(set(line_B[:64])) >= 6 and len(set(line_B[64:])) >= 6


def _symmetries(grid_9x9: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
  """Each generator of the symmetry group applied alone, written independently of `augment`."""
  rows = np.arange(9)
  swap_in_band = rows.copy()
  swap_in_band[[3, 5]] = [5, 3]
  swap_bands = np.r_[6:9, 3:6, 0:3]
  label_10 = np.r_[0, rng.permutation(9) + 1]
  return [grid_9x9.T, grid_9x9[swap_in_band], grid_9x9[swap_bands],
          grid_9x9[:, swap_in_band], grid_9x9[:, swap_bands], label_10[grid_9x9]]


def test_canonical_key_is_invariant_under_every_symmetry(generated, rng):
  puzzle_Nx81, solution_Nx81, _ = generated
  grids_Gx81 = np.concatenate([puzzle_Nx81[:6], solution_Nx81[:6]])
  key_G = sudoku.canonical_keys(grids_Gx81)
  assert key_G.dtype == np.uint64
  for grid_81, key in zip(grids_Gx81, key_G):
    for image_9x9 in _symmetries(grid_81.reshape(9, 9), rng):
      assert sudoku.canonical_key(image_9x9.ravel()) == key
  for _ in range(3):
    image_Gx81 = sudoku.augment(rng, grids_Gx81, grids_Gx81)[0]
    np.testing.assert_array_equal(sudoku.canonical_keys(image_Gx81), key_G)


def test_canonical_key_separates_different_grids(rng):
  grid_Bx81 = sudoku.random_solutions(rng, 300)
  assert len(np.unique(sudoku.canonical_keys(grid_Bx81))) == 300
  # Moves outside the group (a row to another band; one digit changed) change the key.
  puzzle_Bx81 = grid_Bx81 * (rng.random((300, 81)) < 0.35)
  moved_Bx9x9 = puzzle_Bx81.reshape(300, 9, 9)[:, [3, 1, 2, 0, 4, 5, 6, 7, 8]]
  changed_Bx81 = puzzle_Bx81.copy()
  changed_Bx81[:, 40] = grid_Bx81[:, 40] % 9 + 1
  key_B = sudoku.canonical_keys(puzzle_Bx81)
  # Each kept its key in 0.04% of 30000 such puzzles: more than 15 of 300 has probability ~1e-29.
  assert np.mean(sudoku.canonical_keys(moved_Bx9x9.reshape(300, 81)) != key_B) > 0.95
  assert np.mean(sudoku.canonical_keys(changed_Bx81) != key_B) > 0.95
