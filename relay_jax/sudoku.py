"""Sudoku grids: parsing, a batched solver, a puzzle generator, augmentation and a symmetry key.

Grids are int8 arrays of 81 cells in row-major order ([81] or [B, 81]), 0 = blank, 1..9 = digit.

Solver. Candidate sets are 9-bit masks (bit d-1 set = digit d possible), uint16 [N, 81].
Propagation repeats naked singles (a cell with one candidate removes it from its 20 peers) and
hidden singles (a digit with one place left in a row, column or box goes there) until nothing
changes; a search node whose propagation empties a cell, leaves a digit no place in some unit, or
puts a digit twice in a unit is a dead end. Otherwise the search branches on the
minimum-remaining-values cell (fewest candidates, lowest index on ties), one child per candidate.
The search runs over a batch of puzzles at once in numpy: a stack of nodes, each tagged with its
puzzle; each step propagates together the `_WIDTH` most recently pushed nodes of every puzzle
(depth first within a puzzle, so a puzzle with many solutions reaches `limit` of them quickly; all
puzzles in parallel, so the cost is a few numpy calls per step instead of Python work per cell).

Difficulty. `backtracks` = the number of dead ends the search meets. For a puzzle with a unique
solution and `limit >= 2` the whole tree is searched, so the count does not depend on the order in
which nodes are visited; it is 0 exactly when singles alone solve the puzzle. Sudoku-Extreme (the
paper's benchmark, from HRM) rates puzzles by the backtracks of tdoku, whose propagation differs,
so the numbers are comparable in kind only.

Generator (`generate`). A random full grid (the three diagonal boxes filled with random
permutations, the rest by the search with children in random order), then every clue is tried once
in random order and removed if the puzzle keeps a unique solution. The result is minimal (no clue
can be removed): of 10000, clues 20-29 (mean 24.4), 59% with backtracks > 0 (median 1, 90th
percentile 6, 99th 16, max 72); `hard_share` fixes that share. Speed: 10000 puzzles in 45 s
(~220 puzzles/s, one core); ~80% of the time goes to finding the second solution that shows a
clue cannot be removed.

Symmetries (`augment`, `canonical_keys`). Relabelling the digits, permuting rows within a band,
columns within a stack, the bands, the stacks, and transposing all map valid grids to valid grids
(a group of 9! * 6^8 * 2 elements).
"""
import math

import numpy as np

FULL = 0x1FF  # All nine candidates.
# Nodes per puzzle per search step: 2..64 differ by < 30% in generation time; small keeps the
# work of searches that stop at `limit` small.
_WIDTH = 4
# Share of `generate`'s minimal puzzles with backtracks > 0 (measured 57-59%); sizes the
# batches drawn to fill a `hard_share` quota in about one round.
_NATURAL_HARD_SHARE = 0.57

_ROW_9 = np.arange(9)
# The 27 units (9 rows, 9 columns, 9 boxes) as cell indices, and the 3 units of each cell.
_UNITS_27x9 = np.concatenate([
    _ROW_9[:, None] * 9 + _ROW_9[None, :],
    _ROW_9[None, :] * 9 + _ROW_9[:, None],
    np.array([[(3 * (b // 3) + i // 3) * 9 + 3 * (b % 3) + i % 3 for i in range(9)]
              for b in range(9)]),
])
_CELL_UNITS_81x3 = np.stack([np.flatnonzero((_UNITS_27x9 == c).any(1)) for c in range(81)])
_UNIT_NAMES = ("row",) * 9 + ("column",) * 9 + ("box",) * 9
_POPCOUNT_512 = np.array([bin(m).count("1") for m in range(512)], np.int8)
_BIT_10 = np.array([0] + [1 << d for d in range(9)], np.uint16)  # digit d -> bit d-1, blank -> 0


def _duplicate(grid_81: np.ndarray) -> str | None:
  """'digit 5 twice in row 3' for the first unit holding a digit twice, else None."""
  for unit, name in enumerate(_UNIT_NAMES):
    twice = np.flatnonzero(np.bincount(grid_81[_UNITS_27x9[unit]], minlength=10)[1:] > 1)
    if twice.size:
      return f"digit {twice[0] + 1} twice in {name} {unit % 9 + 1}"
  return None


def parse_puzzle(text: str) -> np.ndarray:
  """81 characters (digits 1-9, '.' or '0' for blanks) -> int8 [81].

  Raises:
    ValueError: wrong length, another character, or clues that contradict each other (the message
      names the digit and the row, column or box, numbered from 1).
  """
  if len(text) != 81:
    raise ValueError(f"a puzzle has 81 characters, got {len(text)}")
  for i, char in enumerate(text):
    if char not in ".0123456789":
      raise ValueError(f"bad character {char!r} at position {i + 1} (row {i // 9 + 1}, column "
                       f"{i % 9 + 1}); use 1-9 for clues and '.' or '0' for blanks")
  grid_81 = np.array([0 if char == "." else int(char) for char in text], np.int8)
  duplicate = _duplicate(grid_81)
  if duplicate:
    raise ValueError(f"contradicting clues: {duplicate}")
  return grid_81


def format_grid(grid_81: np.ndarray) -> str:
  """int8 [81] -> 81 characters, '.' for blanks (the inverse of `parse_puzzle`)."""
  return "".join("." if d == 0 else str(d) for d in np.asarray(grid_81).reshape(81))


def valid_solutions(grid_Bx81: np.ndarray) -> np.ndarray:
  """bool [B]: grid b is complete and each row, column and box holds every digit 1..9.

  Takes any integer grids [B, 81]; a value outside 1..9 (a blank, a model's mask token) makes its
  grid invalid.
  """
  grid_Bx81 = np.asarray(grid_Bx81)
  bit_Bx81 = _BIT_10[np.where((grid_Bx81 >= 1) & (grid_Bx81 <= 9), grid_Bx81, 0).astype(np.intp)]
  return (np.bitwise_or.reduce(bit_Bx81[:, _UNITS_27x9], axis=2) == FULL).all(1)


def is_valid_solution(grid_81: np.ndarray) -> bool:
  """`valid_solutions` of one grid [81]."""
  return bool(valid_solutions(np.asarray(grid_81)[None])[0])


def _candidates(grid_Bx81: np.ndarray) -> np.ndarray:
  """Clues -> their single bit, blanks -> FULL; uint16 [B, 81]."""
  grid_Bx81 = np.asarray(grid_Bx81).astype(np.intp)
  return np.where(grid_Bx81 > 0, _BIT_10[grid_Bx81], FULL).astype(np.uint16)


def _once_twice(mask_9xUxn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per unit, the digits in at least one and in at least two of its 9 cells; [U, n] each."""
  once, twice = mask_9xUxn[0].copy(), np.zeros_like(mask_9xUxn[0])
  for mask_Uxn in mask_9xUxn[1:]:
    twice |= once & mask_Uxn
    once |= mask_Uxn
  return once, twice


def _over_cell_units(unit_27xn: np.ndarray) -> np.ndarray:
  """OR, for every cell, of a per-unit mask over the cell's row, column and box; [81, n]."""
  u = _CELL_UNITS_81x3
  return unit_27xn[u[:, 0]] | unit_27xn[u[:, 1]] | unit_27xn[u[:, 2]]


def _propagate(cand_Nx81: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Naked and hidden singles to a fixed point.

  Works cell-major ([81, N]) inside, so that gathering a unit's cells copies whole rows. Masks are
  selected by multiplying with booleans, which is several times cheaper than `np.where`.

  Returns (candidates uint16 [N, 81], dead bool [N], solved bool [N]); a node is solved when every
  cell has one candidate and no unit repeats a digit.
  """
  cand_81xN = np.ascontiguousarray(cand_Nx81.T)
  dead_N = np.zeros(len(cand_Nx81), bool)
  active_n = np.arange(len(cand_Nx81))
  while active_n.size:
    m_81xn = cand_81xN[:, active_n]
    open_81xn = (m_81xn & (m_81xn - 1)) != 0  # More than one candidate.
    placed_once, placed_twice = _once_twice((m_81xn * ~open_81xn)[_UNITS_27x9.T])
    possible_once, possible_twice = _once_twice(m_81xn[_UNITS_27x9.T])
    dead_n = ((m_81xn == 0).any(0) | (placed_twice != 0).any(0)
              | (possible_once != FULL).any(0))
    new_81xn = m_81xn & ~(_over_cell_units(placed_once) * open_81xn)
    hidden_81xn = new_81xn & _over_cell_units(possible_once & ~possible_twice) * open_81xn
    new_81xn = np.where(hidden_81xn != 0, hidden_81xn, new_81xn)
    cand_81xN[:, active_n] = new_81xn
    dead_N[active_n[dead_n]] = True
    active_n = active_n[~dead_n & (new_81xn != m_81xn).any(0)]
  solved_N = ~dead_N & ((cand_81xN & (cand_81xN - 1)) == 0).all(0)
  return cand_81xN.T.copy(), dead_N, solved_N


def _digits(cand_Nx81: np.ndarray) -> np.ndarray:
  """Single-candidate masks -> digits, int8 [N, 81] (log2 of the bit, plus one)."""
  return (np.log2(np.maximum(cand_Nx81, 1)).astype(np.int8) + 1) * (cand_Nx81 > 0)


def _rank_from_top(puzzle_S: np.ndarray) -> np.ndarray:
  """For each stack entry, how many later entries belong to the same puzzle; int [S]."""
  num = len(puzzle_S)
  order_S = np.lexsort((-np.arange(num), puzzle_S))
  sorted_S = puzzle_S[order_S]
  start_G = np.flatnonzero(np.r_[True, sorted_S[1:] != sorted_S[:-1]])
  rank_S = np.empty(num, np.intp)
  rank_S[order_S] = np.arange(num) - np.repeat(start_G, np.diff(np.r_[start_G, num]))
  return rank_S


def _search(cand_Bx81: np.ndarray, limit: int, rng: np.random.Generator | None = None,
            width: int = _WIDTH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Searches B puzzles given as candidate sets; see the module docstring.

  Args:
    cand_Bx81: uint16 [B, 81] candidate masks.
    limit: a puzzle's search stops once this many solutions are found.
    rng: if given, the children of each node are visited in random order (to draw random grids).
    width: nodes per puzzle propagated per step.

  Returns:
    (solutions found, capped at `limit`, int32 [B]; the first solution found, int8 [B, 81], zeros
    where none; dead ends met, int32 [B]).
  """
  num = len(cand_Bx81)
  count_B = np.zeros(num, np.int32)
  backtracks_B = np.zeros(num, np.int32)
  solution_Bx81 = np.zeros((num, 81), np.int8)
  stack_Sx81, stack_puzzle_S = np.asarray(cand_Bx81, np.uint16), np.arange(num)
  while len(stack_puzzle_S):
    take_S = _rank_from_top(stack_puzzle_S) < width
    node_nx81, puzzle_n = stack_Sx81[take_S], stack_puzzle_S[take_S]
    stack_Sx81, stack_puzzle_S = stack_Sx81[~take_S], stack_puzzle_S[~take_S]
    node_nx81, dead_n, solved_n = _propagate(node_nx81)
    np.add.at(backtracks_B, puzzle_n[dead_n], 1)
    found, first = np.unique(puzzle_n[solved_n], return_index=True)
    new = count_B[found] == 0
    solution_Bx81[found[new]] = _digits(node_nx81[solved_n][first[new]])
    np.add.at(count_B, puzzle_n[solved_n], 1)
    # Branch on each open node's minimum-remaining-values cell.
    open_n = ~dead_n & ~solved_n
    node_nx81, puzzle_n = node_nx81[open_n], puzzle_n[open_n]
    pop_nx81 = _POPCOUNT_512[node_nx81]
    cell_n = np.argmin(np.where(pop_nx81 > 1, pop_nx81, 10), axis=1)
    digit_nx9 = np.broadcast_to(np.arange(9), (len(cell_n), 9))
    if rng is not None:
      digit_nx9 = np.argsort(rng.random((len(cell_n), 9)), axis=1)
    has_nx9 = (node_nx81[np.arange(len(cell_n)), cell_n][:, None] >> digit_nx9) & 1 == 1
    # Reversed so that a node's first child ends on top of the stack, i.e. is searched first.
    parent_c, slot_c = (index[::-1] for index in np.nonzero(has_nx9))
    child_cx81 = node_nx81[parent_c]
    child_cx81[np.arange(len(parent_c)), cell_n[parent_c]] = 1 << digit_nx9[parent_c, slot_c]
    stack_Sx81 = np.concatenate([stack_Sx81, child_cx81])
    stack_puzzle_S = np.concatenate([stack_puzzle_S, puzzle_n[parent_c]])
    keep_S = count_B[stack_puzzle_S] < limit
    stack_Sx81, stack_puzzle_S = stack_Sx81[keep_S], stack_puzzle_S[keep_S]
  return np.minimum(count_B, limit), solution_Bx81, backtracks_B


def solve_batch(grid_Bx81: np.ndarray, limit: int = 2
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Solves B puzzles int8 [B, 81] together.

  Returns:
    (number of solutions capped at `limit`, int32 [B]; the first solution found, int8 [B, 81],
    zeros where there is none; backtracks (dead ends met), int32 [B]).
  """
  return _search(_candidates(grid_Bx81), limit)


def solve(grid_81: np.ndarray, limit: int = 2) -> tuple[int, np.ndarray | None, int]:
  """(solutions capped at `limit`, a solution int8 [81] or None, backtracks) of one puzzle [81]."""
  count_1, solution_1x81, backtracks_1 = solve_batch(np.asarray(grid_81)[None], limit)
  return int(count_1[0]), (solution_1x81[0] if count_1[0] else None), int(backtracks_1[0])


def random_solutions(rng: np.random.Generator, n: int) -> np.ndarray:
  """n random valid full grids, int8 [n, 81] (not uniform over all grids; see module docstring)."""
  seed_nx81 = np.zeros((n, 81), np.int8)
  # The diagonal boxes share no row or column, so any three permutations are consistent, and every
  # such filling completes to a full grid.
  for box in (0, 4, 8):
    seed_nx81[:, _UNITS_27x9[18 + box]] = np.argsort(rng.random((n, 9)), axis=1) + 1
  count_n, grid_nx81, _ = _search(_candidates(seed_nx81), 1, rng, width=1)
  assert count_n.all()
  return grid_nx81


def _minimal_puzzles(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """n minimal puzzles from fresh grids: (puzzles, solutions) int8 [n, 81], backtracks [n]."""
  rng = np.random.default_rng(seed)
  solution_nx81 = random_solutions(rng, n)
  puzzle_nx81 = solution_nx81.copy()
  rows_n = np.arange(n)
  for cell_n in np.argsort(rng.random((n, 81)), axis=1).T:
    # Removing a clue keeps the solution unique iff no solution has another digit in its cell.
    cand_nx81 = _candidates(puzzle_nx81)
    cand_nx81[rows_n, cell_n] = FULL & ~_BIT_10[solution_nx81[rows_n, cell_n]]
    unique_n = _search(cand_nx81, 1)[0] == 0
    puzzle_nx81[rows_n[unique_n], cell_n[unique_n]] = 0
  count_n, _, backtracks_n = solve_batch(puzzle_nx81)
  assert (count_n == 1).all()
  return puzzle_nx81, solution_nx81, backtracks_n


def generate(rng: np.random.Generator, n: int, *, hard_share: float | None = None,
             batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """n minimal puzzles with unique solutions, each from its own random grid, in random order.

  Runs in this process: numpy threads gain nothing (the GIL is held between small calls), and
  spawned workers re-run the caller's main script, which deadlocks on `core.data.load`'s dataset
  lock when that script loads this dataset.

  Args:
    rng: draws the seed of every batch and the final order.
    n: number of puzzles.
    hard_share: if given, exactly round(hard_share * n) puzzles have backtracks > 0 (surplus
      puzzles are discarded; about 57% of minimal puzzles have them); None keeps the natural mix.
    batch_size: at most this many puzzles are generated together (each batch costs ~1 s of fixed
      numpy overhead; memory is a few MB per 1000).

  Returns:
    (puzzles int8 [n, 81], solutions int8 [n, 81], backtracks int32 [n]).
  """
  quota = {True: n, False: n} if hard_share is None else {
      True: round(hard_share * n), False: n - round(hard_share * n)}
  kept = []
  while len(kept) < n:
    size = n - len(kept) if hard_share is None else math.ceil(1.1 * max(
        quota[True] / _NATURAL_HARD_SHARE, quota[False] / (1 - _NATURAL_HARD_SHARE)))
    num_batches = -(-size // batch_size)
    for seed in rng.integers(2**63, size=num_batches):
      for example in zip(*_minimal_puzzles(int(seed), -(-size // num_batches))):
        hard = bool(example[2] > 0)
        if quota[hard] and len(kept) < n:
          quota[hard] -= 1
          kept.append(example)
  puzzle_nx81, solution_nx81, backtracks_n = (np.stack(a) for a in zip(*kept))
  order_n = rng.permutation(n)
  return puzzle_nx81[order_n], solution_nx81[order_n], backtracks_n[order_n].astype(np.int32)


def augment(rng: np.random.Generator, puzzle_Bx81: np.ndarray, solution_Bx81: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
  """Applies one uniformly random symmetry per row b to both puzzle b and solution b.

  The symmetry: digit relabelling (blanks stay 0), a permutation of the bands and of the rows
  within each band, of the stacks and of the columns within each stack, then a transpose with
  probability 1/2. Takes and returns int8 [B, 81] pairs.
  """
  num = len(puzzle_Bx81)
  # One draw for every choice; argsort of uniforms is a uniform random permutation.
  u_Bx34 = rng.random((num, 34))
  band_Bx3, stack_Bx3 = np.argsort(u_Bx34[:, 0:3], 1), np.argsort(u_Bx34[:, 3:6], 1)
  row_in_Bx9 = np.argsort(u_Bx34[:, 6:15].reshape(num, 3, 3), 2).reshape(num, 9)
  column_in_Bx9 = np.argsort(u_Bx34[:, 15:24].reshape(num, 3, 3), 2).reshape(num, 9)
  label_Bx10 = np.concatenate([np.zeros((num, 1), np.int8),
                               np.argsort(u_Bx34[:, 24:33], 1).astype(np.int8) + 1], 1)
  # Output row i is row row_in[b, i] of band band[b, i // 3] of the input; columns alike.
  row_Bx9 = 3 * band_Bx3[:, _ROW_9 // 3] + row_in_Bx9
  column_Bx9 = 3 * stack_Bx3[:, _ROW_9 // 3] + column_in_Bx9
  source_Bx9x9 = 9 * row_Bx9[:, :, None] + column_Bx9[:, None, :]
  transpose_B = u_Bx34[:, 33] < 0.5
  source_Bx9x9[transpose_B] = source_Bx9x9[transpose_B].transpose(0, 2, 1)

  def apply(grid_Bx81):
    moved_Bx81 = np.take_along_axis(np.asarray(grid_Bx81), source_Bx9x9.reshape(num, 81), 1)
    return np.take_along_axis(label_Bx10, moved_Bx81.astype(np.intp), 1)

  return apply(puzzle_Bx81), apply(solution_Bx81)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective scramble of uint64 values (wrapping arithmetic)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


# Relation of minirow a = (row r, stack s) to minirow b: same row, same band, same stack (as bits
# 4, 2, 1); every symmetry maps minirows to minirows and keeps these relations.
_MINIROW_R_27, _MINIROW_S_27 = np.divmod(np.arange(27), 3)
_RELATION_27x27 = (4 * (_MINIROW_R_27[:, None] == _MINIROW_R_27[None])
                   + 2 * (_MINIROW_R_27[:, None] // 3 == _MINIROW_R_27[None] // 3)
                   + (_MINIROW_S_27[:, None] == _MINIROW_S_27[None])).astype(np.uint64)
_WL_ROUNDS = 3
_KEY_CHUNK = 4096  # Grids hashed together: bounds the [chunk, 27, 27] uint64 temporaries (~24 MB).


def _minirow_hash(grid_Bx9x9: np.ndarray) -> np.ndarray:
  """A hash of the minirow graph of each grid, invariant under the row-side symmetries; uint64 [B].

  Nodes: the 27 minirows (3 cells of a row inside one stack) as digit sets. Edge colour of (a, b):
  `_RELATION_27x27` and |set a & set b|. Digit relabelling, column moves within a stack and
  stack/band/row permutations only permute nodes, preserving edge colours, so any function of the
  graph up to node permutation is invariant; this one is 3 rounds of Weisfeiler-Lehman colour
  refinement with multisets hashed as sums of `_mix`.
  """
  num = len(grid_Bx9x9)
  set_Bx27 = np.bitwise_or.reduce(
      _BIT_10[grid_Bx9x9.astype(np.intp)].reshape(num, 9, 3, 3), axis=3).reshape(num, 27)
  overlap_Bx27x27 = _POPCOUNT_512[set_Bx27[:, :, None] & set_Bx27[:, None, :]]
  edge_Bx27x27 = _mix(_RELATION_27x27 * np.uint64(4) + overlap_Bx27x27.astype(np.uint64))
  colour_Bx27 = np.diagonal(edge_Bx27x27, axis1=1, axis2=2).copy()
  for _ in range(_WL_ROUNDS):
    neighbours_Bx27 = _mix(edge_Bx27x27 ^ colour_Bx27[:, None, :]).sum(2)
    colour_Bx27 = _mix(colour_Bx27 * np.uint64(3) + neighbours_Bx27)
  return _mix(colour_Bx27).sum(1)


def canonical_keys(grid_Bx81: np.ndarray) -> np.ndarray:
  """A key, uint64 [B], equal for grids related by any symmetry (see `augment`); blanks allowed.

  It is an invariant, not a canonical form: two grids with the same key need not be equivalent
  (a false "shared" detection), but equivalent grids always have the same key, so dropping test
  puzzles whose key occurs in train never misses a shared puzzle. The key combines
  `_minirow_hash` of the grid and of its transpose (minicolumns) symmetrically, so a transpose
  swaps two inputs of a symmetric function. A complete canonical form would minimise over
  2 * 6^8 row/column arrangements (~3.4M) per grid; this costs ~0.1 ms per grid. Collisions:
  none among the 20000 solution grids of a 20000-puzzle `generate` run, nor in the tests.
  """
  grid_Bx9x9 = np.asarray(grid_Bx81).reshape(-1, 9, 9)
  keys = []
  for start in range(0, len(grid_Bx9x9), _KEY_CHUNK):
    part_bx9x9 = grid_Bx9x9[start:start + _KEY_CHUNK]
    row_b = _minirow_hash(part_bx9x9)
    column_b = _minirow_hash(part_bx9x9.transpose(0, 2, 1))
    keys.append(_mix(_mix(np.minimum(row_b, column_b)) + np.maximum(row_b, column_b)))
  return np.concatenate(keys) if keys else np.zeros(0, np.uint64)


def canonical_key(grid_81: np.ndarray) -> int:
  """`canonical_keys` of one grid [81]."""
  return int(canonical_keys(np.asarray(grid_81)[None])[0])
