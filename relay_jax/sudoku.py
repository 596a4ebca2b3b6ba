"""Sudoku grids of any supported size n (4x4, 6x6, 8x8, 9x9): parsing, a batched solver, a puzzle
generator, augmentation and a symmetry key.

Grids are int8 arrays of n*n cells in row-major order ([n*n] or [B, n*n]), 0 = blank, 1..n = digit;
every function reads n from the last axis. Boxes are `box_shape(n)` = (rows, columns): 2x2, 2x3,
2x4 and 3x3. The rows form n / rows bands, the columns n / columns stacks.

Solver. Candidate sets are n-bit masks (bit d-1 set = digit d possible), uint16 [N, n*n].
Propagation repeats naked singles (a cell with one candidate removes it from its peers) and hidden
singles (a digit with one place left in a row, column or box goes there) until nothing changes; a
search node whose propagation empties a cell, leaves a digit no place in some unit, or puts a digit
twice in a unit is a dead end. Otherwise the search branches on the minimum-remaining-values cell
(fewest candidates, lowest index on ties), one child per candidate. The search runs over a batch of
puzzles at once in numpy: a stack of nodes, each tagged with its puzzle; each step propagates
together the `_WIDTH` most recently pushed nodes of every puzzle (depth first within a puzzle, so a
puzzle with many solutions reaches `limit` of them quickly; all puzzles in parallel, so the cost is
a few numpy calls per step instead of Python work per cell).

Difficulty. `backtracks` = the number of dead ends the search meets. For a puzzle with a unique
solution and `limit >= 2` the whole tree is searched, so the count does not depend on the order in
which nodes are visited; it is 0 exactly when singles alone solve the puzzle. Sudoku-Extreme (the
paper's benchmark, from HRM) rates puzzles by the backtracks of tdoku, whose propagation differs,
so the numbers are comparable in kind only.

Generator (`generate`). A random full grid (the diagonal boxes, which share no row or column,
filled with random permutations, the rest by the search with children in random order), then every
clue is tried once in random order and removed if the puzzle keeps a unique solution. The result is
minimal (no clue can be removed). 9x9: of 10000, clues 20-29 (mean 24.4), 59% with backtracks > 0
(median 1, 90th percentile 6, 99th 16, max 72); `hard_share` fixes that share; 10000 puzzles in
45 s (~220 puzzles/s, one core); ~80% of the time goes to finding the second solution that shows a
clue cannot be removed.

Symmetries (`augment`, `canonical_keys`). Relabelling the digits, permuting rows within a band,
columns within a stack, the bands, the stacks, and (square boxes only: a transpose turns 2x3 boxes
into 3x2 ones) transposing map valid grids to valid grids (9! * 6^8 * 2 elements for 9x9).
"""
import dataclasses
import functools
import math

import numpy as np

SIZES = (4, 6, 8, 9)   # n: composite (a box of at least 2x2), one character per digit
# Nodes per puzzle per search step: 2..64 differ by < 30% in generation time; small keeps the
# work of searches that stop at `limit` small.
_WIDTH = 4
# Share of `generate`'s minimal 9x9 puzzles with backtracks > 0 (measured 57-59%); sizes the
# batches drawn to fill a `hard_share` quota in about one round (other sizes: see `generate`).
_NATURAL_HARD_SHARE = {9: 0.57}
_POPCOUNT_512 = np.array([bin(m).count("1") for m in range(512)], np.int8)


def box_shape(n: int) -> tuple[int, int]:
  """(rows, columns) of a box of the n x n grid: the most nearly square factorisation, rows <=
  columns (4: 2x2, 6: 2x3, 8: 2x4, 9: 3x3)."""
  if n not in SIZES:
    raise ValueError(f"grid size must be one of {SIZES}, got {n}")
  rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
  return rows, n // rows


@dataclasses.dataclass(frozen=True, eq=False)
class Geometry:
  """The index tables of the n x n grid.

  units_Uxn: the 3n units (n rows, n columns, n boxes) as cell indices; cell_units_Cx3: the three
  units of each of the C = n*n cells; bit: digit d -> its candidate bit (blank -> 0), [n + 1].
  """
  n: int
  box_rows: int
  box_cols: int
  full: int
  units_Uxn: np.ndarray
  cell_units_Cx3: np.ndarray
  unit_names: tuple
  bit: np.ndarray

  @property
  def cells(self) -> int:
    return self.n * self.n

  @property
  def bands(self) -> int:
    return self.n // self.box_rows

  @property
  def stacks(self) -> int:
    return self.n // self.box_cols


@functools.lru_cache(maxsize=None)
def geometry(n: int) -> Geometry:
  """The `Geometry` of n x n grids (cached)."""
  box_rows, box_cols = box_shape(n)
  r = np.arange(n)
  stacks = n // box_cols
  boxes = np.array([[(box_rows * (b // stacks) + i // box_cols) * n + box_cols * (b % stacks)
                     + i % box_cols for i in range(n)] for b in range(n)])
  units = np.concatenate([r[:, None] * n + r[None, :], r[None, :] * n + r[:, None], boxes])
  cell_units = np.stack([np.flatnonzero((units == c).any(1)) for c in range(n * n)])
  return Geometry(n, box_rows, box_cols, (1 << n) - 1, units, cell_units,
                  ("row",) * n + ("column",) * n + ("box",) * n,
                  np.array([0] + [1 << d for d in range(n)], np.uint16))


def size_of(cells: int) -> int:
  """n for grids of `cells` = n*n cells; ValueError naming the supported lengths otherwise."""
  n = math.isqrt(cells)
  if n * n != cells or n not in SIZES:
    raise ValueError(f"a grid has {' or '.join(str(s * s) for s in SIZES)} cells (an n x n grid, "
                     f"n in {SIZES}), got {cells}")
  return n


def _geometry_of(grid) -> Geometry:
  return geometry(size_of(np.shape(grid)[-1]))


def _duplicate(grid_C: np.ndarray) -> str | None:
  """'digit 5 twice in row 3' for the first unit holding a digit twice, else None."""
  g = _geometry_of(grid_C)
  for unit, name in enumerate(g.unit_names):
    twice = np.flatnonzero(np.bincount(grid_C[g.units_Uxn[unit]], minlength=g.n + 1)[1:] > 1)
    if twice.size:
      return f"digit {twice[0] + 1} twice in {name} {unit % g.n + 1}"
  return None


def parse_puzzle(text: str, size: int | None = None) -> np.ndarray:
  """n*n characters (digits 1-n, '.' or '0' for blanks) -> int8 [n*n]; n is `size`, or read from
  the length when None.

  Raises:
    ValueError: a wrong length, another character, or clues that contradict each other (the
      message names the digit and the row, column or box, numbered from 1).
  """
  if size is not None and len(text) != size * size:
    raise ValueError(f"a {size}x{size} puzzle has {size * size} characters, got {len(text)}")
  n = math.isqrt(len(text))
  if n * n != len(text) or n not in SIZES:
    raise ValueError(f"a puzzle has {', '.join(str(s * s) for s in SIZES)} characters (n x n, n in "
                     f"{SIZES}), got {len(text)}")
  allowed = ".0" + "".join(str(d) for d in range(1, n + 1))
  for i, char in enumerate(text):
    if char not in allowed:
      raise ValueError(f"bad character {char!r} at position {i + 1} (row {i // n + 1}, column "
                       f"{i % n + 1}); use 1-{n} for clues of a {n}x{n} grid and '.' or '0' for "
                       "blanks")
  grid_C = np.array([0 if char == "." else int(char) for char in text], np.int8)
  duplicate = _duplicate(grid_C)
  if duplicate:
    raise ValueError(f"contradicting clues: {duplicate}")
  return grid_C


def format_grid(grid_C: np.ndarray) -> str:
  """int8 [n*n] -> n*n characters, '.' for blanks (the inverse of `parse_puzzle`)."""
  return "".join("." if d == 0 else str(d) for d in np.asarray(grid_C).ravel())


def valid_solutions(grid_BxC: np.ndarray) -> np.ndarray:
  """bool [B]: grid b is complete and each row, column and box holds every digit 1..n.

  Takes any integer grids [B, n*n]; a value outside 1..n (a blank, a model's mask token) makes its
  grid invalid.
  """
  grid_BxC = np.asarray(grid_BxC)
  g = _geometry_of(grid_BxC)
  ok = (grid_BxC >= 1) & (grid_BxC <= g.n)
  bit_BxC = g.bit[np.where(ok, grid_BxC, 0).astype(np.intp)]
  return (np.bitwise_or.reduce(bit_BxC[:, g.units_Uxn], axis=2) == g.full).all(1)


def is_valid_solution(grid_C: np.ndarray) -> bool:
  """`valid_solutions` of one grid [n*n]."""
  return bool(valid_solutions(np.asarray(grid_C)[None])[0])


def _candidates(grid_BxC: np.ndarray) -> np.ndarray:
  """Clues -> their single bit, blanks -> all n bits; uint16 [B, n*n]."""
  g = _geometry_of(grid_BxC)
  grid_BxC = np.asarray(grid_BxC).astype(np.intp)
  return np.where(grid_BxC > 0, g.bit[grid_BxC], g.full).astype(np.uint16)


def _once_twice(mask_nxUxm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per unit, the digits in at least one and in at least two of its n cells; [U, m] each."""
  once, twice = mask_nxUxm[0].copy(), np.zeros_like(mask_nxUxm[0])
  for mask_Uxm in mask_nxUxm[1:]:
    twice |= once & mask_Uxm
    once |= mask_Uxm
  return once, twice


def _over_cell_units(g: Geometry, unit_Uxm: np.ndarray) -> np.ndarray:
  """OR, for every cell, of a per-unit mask over the cell's row, column and box; [C, m]."""
  u = g.cell_units_Cx3
  return unit_Uxm[u[:, 0]] | unit_Uxm[u[:, 1]] | unit_Uxm[u[:, 2]]


def _propagate(cand_NxC: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Naked and hidden singles to a fixed point.

  Works cell-major ([C, N]) inside, so that gathering a unit's cells copies whole rows. Masks are
  selected by multiplying with booleans, which is several times cheaper than `np.where`.

  Returns (candidates uint16 [N, C], dead bool [N], solved bool [N]); a node is solved when every
  cell has one candidate and no unit repeats a digit.
  """
  g = _geometry_of(cand_NxC)
  units_nxU = g.units_Uxn.T
  cand_CxN = np.ascontiguousarray(cand_NxC.T)
  dead_N = np.zeros(len(cand_NxC), bool)
  active_m = np.arange(len(cand_NxC))
  while active_m.size:
    m_Cxm = cand_CxN[:, active_m]
    open_Cxm = (m_Cxm & (m_Cxm - 1)) != 0  # More than one candidate.
    placed_once, placed_twice = _once_twice((m_Cxm * ~open_Cxm)[units_nxU])
    possible_once, possible_twice = _once_twice(m_Cxm[units_nxU])
    dead_m = ((m_Cxm == 0).any(0) | (placed_twice != 0).any(0)
              | (possible_once != g.full).any(0))
    new_Cxm = m_Cxm & ~(_over_cell_units(g, placed_once) * open_Cxm)
    hidden_Cxm = new_Cxm & _over_cell_units(g, possible_once & ~possible_twice) * open_Cxm
    new_Cxm = np.where(hidden_Cxm != 0, hidden_Cxm, new_Cxm)
    cand_CxN[:, active_m] = new_Cxm
    dead_N[active_m[dead_m]] = True
    active_m = active_m[~dead_m & (new_Cxm != m_Cxm).any(0)]
  solved_N = ~dead_N & ((cand_CxN & (cand_CxN - 1)) == 0).all(0)
  return cand_CxN.T.copy(), dead_N, solved_N


def _digits(cand_NxC: np.ndarray) -> np.ndarray:
  """Single-candidate masks -> digits, int8 [N, C] (log2 of the bit, plus one)."""
  return (np.log2(np.maximum(cand_NxC, 1)).astype(np.int8) + 1) * (cand_NxC > 0)


def _rank_from_top(puzzle_S: np.ndarray) -> np.ndarray:
  """For each stack entry, how many later entries belong to the same puzzle; int [S]."""
  num = len(puzzle_S)
  order_S = np.lexsort((-np.arange(num), puzzle_S))
  sorted_S = puzzle_S[order_S]
  start_G = np.flatnonzero(np.r_[True, sorted_S[1:] != sorted_S[:-1]])
  rank_S = np.empty(num, np.intp)
  rank_S[order_S] = np.arange(num) - np.repeat(start_G, np.diff(np.r_[start_G, num]))
  return rank_S


def _search(cand_BxC: np.ndarray, limit: int, rng: np.random.Generator | None = None,
            width: int = _WIDTH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Searches B puzzles given as candidate sets; see the module docstring.

  Args:
    cand_BxC: uint16 [B, n*n] candidate masks.
    limit: a puzzle's search stops once this many solutions are found.
    rng: if given, the children of each node are visited in random order (to draw random grids).
    width: nodes per puzzle propagated per step.

  Returns:
    (solutions found, capped at `limit`, int32 [B]; the first solution found, int8 [B, n*n], zeros
    where none; dead ends met, int32 [B]).
  """
  num, cells = np.shape(cand_BxC)
  n = size_of(cells)
  count_B = np.zeros(num, np.int32)
  backtracks_B = np.zeros(num, np.int32)
  solution_BxC = np.zeros((num, cells), np.int8)
  stack_SxC, stack_puzzle_S = np.asarray(cand_BxC, np.uint16), np.arange(num)
  while len(stack_puzzle_S):
    take_S = _rank_from_top(stack_puzzle_S) < width
    node_mxC, puzzle_m = stack_SxC[take_S], stack_puzzle_S[take_S]
    stack_SxC, stack_puzzle_S = stack_SxC[~take_S], stack_puzzle_S[~take_S]
    node_mxC, dead_m, solved_m = _propagate(node_mxC)
    np.add.at(backtracks_B, puzzle_m[dead_m], 1)
    found, first = np.unique(puzzle_m[solved_m], return_index=True)
    new = count_B[found] == 0
    solution_BxC[found[new]] = _digits(node_mxC[solved_m][first[new]])
    np.add.at(count_B, puzzle_m[solved_m], 1)
    # Branch on each open node's minimum-remaining-values cell.
    open_m = ~dead_m & ~solved_m
    node_mxC, puzzle_m = node_mxC[open_m], puzzle_m[open_m]
    pop_mxC = _POPCOUNT_512[node_mxC]
    cell_m = np.argmin(np.where(pop_mxC > 1, pop_mxC, n + 1), axis=1)
    digit_mxn = np.broadcast_to(np.arange(n), (len(cell_m), n))
    if rng is not None:
      digit_mxn = np.argsort(rng.random((len(cell_m), n)), axis=1)
    has_mxn = (node_mxC[np.arange(len(cell_m)), cell_m][:, None] >> digit_mxn) & 1 == 1
    # Reversed so that a node's first child ends on top of the stack, i.e. is searched first.
    parent_c, slot_c = (index[::-1] for index in np.nonzero(has_mxn))
    child_cxC = node_mxC[parent_c]
    child_cxC[np.arange(len(parent_c)), cell_m[parent_c]] = 1 << digit_mxn[parent_c, slot_c]
    stack_SxC = np.concatenate([stack_SxC, child_cxC])
    stack_puzzle_S = np.concatenate([stack_puzzle_S, puzzle_m[parent_c]])
    keep_S = count_B[stack_puzzle_S] < limit
    stack_SxC, stack_puzzle_S = stack_SxC[keep_S], stack_puzzle_S[keep_S]
  return np.minimum(count_B, limit), solution_BxC, backtracks_B


def solve_batch(grid_BxC: np.ndarray, limit: int = 2
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Solves B puzzles int8 [B, n*n] together.

  Returns:
    (number of solutions capped at `limit`, int32 [B]; the first solution found, int8 [B, n*n],
    zeros where there is none; backtracks (dead ends met), int32 [B]).
  """
  return _search(_candidates(grid_BxC), limit)


def solve(grid_C: np.ndarray, limit: int = 2) -> tuple[int, np.ndarray | None, int]:
  """(solutions capped at `limit`, a solution int8 [n*n] or None, backtracks) of one puzzle."""
  count_1, solution_1xC, backtracks_1 = solve_batch(np.asarray(grid_C)[None], limit)
  return int(count_1[0]), (solution_1xC[0] if count_1[0] else None), int(backtracks_1[0])


def random_solutions(rng: np.random.Generator, count: int, size: int = 9) -> np.ndarray:
  """`count` random valid full size x size grids, int8 [count, size*size] (not uniform over all
  grids; see the module docstring)."""
  g = geometry(size)
  grid_kxC = np.zeros((count, g.cells), np.int8)
  todo_k = np.arange(count)
  while todo_k.size:
    seed_kxC = np.zeros((len(todo_k), g.cells), np.int8)
    # Diagonal boxes share no row or column, so any permutations in them are consistent; on 9x9
    # every such filling completes, elsewhere the rows whose filling does not are drawn again.
    for i in range(min(g.bands, g.stacks)):
      box = g.units_Uxn[2 * g.n + i * g.stacks + i]
      seed_kxC[:, box] = np.argsort(rng.random((len(todo_k), g.n)), axis=1) + 1
    found_k, grid_kxC[todo_k], _ = _search(_candidates(seed_kxC), 1, rng, width=1)
    todo_k = todo_k[found_k == 0]
  return grid_kxC


def _minimal_puzzles(seed: int, count: int, size: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`count` minimal puzzles from fresh grids: (puzzles, solutions) int8 [count, size*size],
  backtracks [count]."""
  g = geometry(size)
  rng = np.random.default_rng(seed)
  solution_kxC = random_solutions(rng, count, size)
  puzzle_kxC = solution_kxC.copy()
  rows_k = np.arange(count)
  for cell_k in np.argsort(rng.random((count, g.cells)), axis=1).T:
    # Removing a clue keeps the solution unique iff no solution has another digit in its cell.
    cand_kxC = _candidates(puzzle_kxC)
    cand_kxC[rows_k, cell_k] = g.full & ~g.bit[solution_kxC[rows_k, cell_k]]
    unique_k = _search(cand_kxC, 1)[0] == 0
    puzzle_kxC[rows_k[unique_k], cell_k[unique_k]] = 0
  count_k, _, backtracks_k = solve_batch(puzzle_kxC)
  assert (count_k == 1).all()
  return puzzle_kxC, solution_kxC, backtracks_k


def generate(rng: np.random.Generator, count: int, *, size: int = 9,
             hard_share: float | None = None, batch_size: int = 1000
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`count` minimal size x size puzzles with unique solutions, each from its own random grid, in
  random order.

  Runs in this process: numpy threads gain nothing (the GIL is held between small calls), and
  spawned workers re-run the caller's main script, which deadlocks on `core.data.load`'s dataset
  lock when that script loads this dataset.

  Args:
    rng: draws the seed of every batch and the final order.
    count: number of puzzles.
    size: n, the grid's side (`SIZES`).
    hard_share: if given, exactly round(hard_share * count) puzzles have backtracks > 0 (surplus
      puzzles are discarded; about 57% of minimal 9x9 puzzles have them; on smaller grids, where
      the share is not measured, batches of `count` are drawn until the quota is met); None keeps
      the natural mix.
    batch_size: at most this many puzzles are generated together (each batch costs ~1 s of fixed
      numpy overhead; memory is a few MB per 1000).

  Returns:
    (puzzles int8 [count, n*n], solutions int8 [count, n*n], backtracks int32 [count]).
  """
  geometry(size)    # checks the size
  quota = {True: count, False: count} if hard_share is None else {
      True: round(hard_share * count), False: count - round(hard_share * count)}
  natural = _NATURAL_HARD_SHARE.get(size)
  kept = []
  while len(kept) < count:
    want = count - len(kept)
    if hard_share is not None and natural is not None:
      want = math.ceil(1.1 * max(quota[True] / natural, quota[False] / (1 - natural)))
    num_batches = -(-want // batch_size)
    for seed in rng.integers(2**63, size=num_batches):
      for example in zip(*_minimal_puzzles(int(seed), -(-want // num_batches), size)):
        hard = bool(example[2] > 0)
        if quota[hard] and len(kept) < count:
          quota[hard] -= 1
          kept.append(example)
  puzzle_kxC, solution_kxC, backtracks_k = (np.stack(a) for a in zip(*kept))
  order_k = rng.permutation(count)
  return puzzle_kxC[order_k], solution_kxC[order_k], backtracks_k[order_k].astype(np.int32)


def augment(rng: np.random.Generator, puzzle_BxC: np.ndarray, solution_BxC: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
  """Applies one uniformly random symmetry per row b to both puzzle b and solution b.

  The symmetry: digit relabelling (blanks stay 0), a permutation of the bands and of the rows
  within each band, of the stacks and of the columns within each stack, then (square boxes only)
  a transpose with probability 1/2. Takes and returns int8 [B, n*n] pairs.
  """
  g = _geometry_of(puzzle_BxC)
  num, n = len(puzzle_BxC), g.n
  # One draw for every choice; argsort of uniforms is a uniform random permutation.
  u_BxU = rng.random((num, g.bands + g.stacks + 3 * n + 1))
  cut = np.cumsum([g.bands, g.stacks, n, n, n])
  band_u, stack_u, row_u, column_u, label_u, transpose_u = np.split(u_BxU, cut, axis=1)
  band_Bxb, stack_Bxs = np.argsort(band_u, 1), np.argsort(stack_u, 1)
  row_in_Bxn = np.argsort(row_u.reshape(num, g.bands, g.box_rows), 2).reshape(num, n)
  column_in_Bxn = np.argsort(column_u.reshape(num, g.stacks, g.box_cols), 2).reshape(num, n)
  label_Bxl = np.concatenate([np.zeros((num, 1), np.int8),
                              np.argsort(label_u, 1).astype(np.int8) + 1], 1)
  # Output row i is row row_in[b, i] of band band[b, i // box_rows] of the input; columns alike.
  index_n = np.arange(n)
  row_Bxn = g.box_rows * band_Bxb[:, index_n // g.box_rows] + row_in_Bxn
  column_Bxn = g.box_cols * stack_Bxs[:, index_n // g.box_cols] + column_in_Bxn
  source_Bxnxn = n * row_Bxn[:, :, None] + column_Bxn[:, None, :]
  if g.box_rows == g.box_cols:
    transpose_B = transpose_u[:, 0] < 0.5
    source_Bxnxn[transpose_B] = source_Bxnxn[transpose_B].transpose(0, 2, 1)

  def apply(grid_BxC):
    moved_BxC = np.take_along_axis(np.asarray(grid_BxC), source_Bxnxn.reshape(num, g.cells), 1)
    return np.take_along_axis(label_Bxl, moved_BxC.astype(np.intp), 1)

  return apply(puzzle_BxC), apply(solution_BxC)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective scramble of uint64 values (wrapping arithmetic)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=None)
def _minirow_relation(n: int, band_rows: int, stack_cols: int) -> np.ndarray:
  """Relation of minirow a = (row r, stack s) to minirow b: same row, same band, same stack (as
  bits 4, 2, 1); every symmetry maps minirows to minirows and keeps these relations. uint64 [M, M],
  M = n * n / stack_cols."""
  row_M, stack_M = np.divmod(np.arange(n * (n // stack_cols)), n // stack_cols)
  return (4 * (row_M[:, None] == row_M[None]) + 2 * (row_M[:, None] // band_rows
          == row_M[None] // band_rows) + (stack_M[:, None] == stack_M[None])).astype(np.uint64)


_WL_ROUNDS = 3
_KEY_CHUNK = 4096  # Grids hashed together: bounds the [chunk, 27, 27] uint64 temporaries (~24 MB).


def _minirow_hash(grid_Bxnxn: np.ndarray, band_rows: int, stack_cols: int) -> np.ndarray:
  """A hash of the minirow graph of each grid, invariant under the row-side symmetries; uint64 [B].

  Nodes: the minirows (the stack_cols cells of a row inside one stack) as digit sets. Edge colour
  of (a, b): `_minirow_relation` and |set a & set b|. Digit relabelling, column moves within a
  stack and stack/band/row permutations only permute nodes, preserving edge colours, so any
  function of the graph up to node permutation is invariant; this one is 3 rounds of
  Weisfeiler-Lehman colour refinement with multisets hashed as sums of `_mix`.
  """
  num, n = grid_Bxnxn.shape[:2]
  g = geometry(n)
  set_BxM = np.bitwise_or.reduce(g.bit[grid_Bxnxn.astype(np.intp)].reshape(
      num, n, n // stack_cols, stack_cols), axis=3).reshape(num, -1)
  overlap_BxMxM = _POPCOUNT_512[set_BxM[:, :, None] & set_BxM[:, None, :]]
  relation_MxM = _minirow_relation(n, band_rows, stack_cols)
  edge_BxMxM = _mix(relation_MxM * np.uint64(16) + overlap_BxMxM.astype(np.uint64))
  colour_BxM = np.diagonal(edge_BxMxM, axis1=1, axis2=2).copy()
  for _ in range(_WL_ROUNDS):
    neighbours_BxM = _mix(edge_BxMxM ^ colour_BxM[:, None, :]).sum(2)
    colour_BxM = _mix(colour_BxM * np.uint64(3) + neighbours_BxM)
  return _mix(colour_BxM).sum(1)


def canonical_keys(grid_BxC: np.ndarray) -> np.ndarray:
  """A key, uint64 [B], equal for grids related by any symmetry (see `augment`); blanks allowed.

  It is an invariant, not a canonical form: two grids with the same key need not be equivalent
  (a false "shared" detection), but equivalent grids always have the same key, so dropping test
  puzzles whose key occurs in train never misses a shared puzzle. The key combines
  `_minirow_hash` of the grid and of its transpose (minicolumns); with square boxes it combines
  them symmetrically, so a transpose swaps two inputs of a symmetric function. A complete
  canonical form would minimise over 2 * 6^8 row/column arrangements (~3.4M for 9x9) per grid;
  this costs ~0.1 ms per grid. Collisions: none among the 20000 solution grids of a 20000-puzzle
  9x9 `generate` run, nor in the tests.
  """
  g = _geometry_of(grid_BxC)
  grid_Bxnxn = np.asarray(grid_BxC).reshape(-1, g.n, g.n)
  keys = []
  for start in range(0, len(grid_Bxnxn), _KEY_CHUNK):
    part_bxnxn = grid_Bxnxn[start:start + _KEY_CHUNK]
    row_b = _minirow_hash(part_bxnxn, g.box_rows, g.box_cols)
    column_b = _minirow_hash(part_bxnxn.transpose(0, 2, 1), g.box_cols, g.box_rows)
    if g.box_rows == g.box_cols:
      row_b, column_b = np.minimum(row_b, column_b), np.maximum(row_b, column_b)
    keys.append(_mix(_mix(row_b) + column_b))
  return np.concatenate(keys) if keys else np.zeros(0, np.uint64)


def canonical_key(grid_C: np.ndarray) -> int:
  """`canonical_keys` of one grid [n*n]."""
  return int(canonical_keys(np.asarray(grid_C)[None])[0])
