"""The `sudoku` tfds builder, an augmentation transform for `BatchIterator`, and puzzle files.

Stands in for Sudoku-Extreme (HRM's 3.8M / 423k hard puzzles), which cannot be downloaded here:
puzzles come from `sudoku.generate` (minimal puzzles with unique solutions, each from its own
random grid, rated by the solver's backtracks).

BuilderConfigs (train / test puzzles). 9x9, in each split a `hard_share` of 60% with
backtracks > 0:
  * `small`: 10000 / 1000; built in 60 s (one process, see `sudoku.generate`). Clues 21-29 (mean
    24.4); backtracks: median 1, 90th percentile 6, 99th 17.
  * `graded`: 10000 / 1000 from the same kind of minimal puzzles (another seed), each given back
    a uniform 0-30 of its solution's missing digits as extra clues and then re-rated: a mix from
    minimal to easy.
  * `large`: 100000 / 2000 minimal puzzles for the paper preset (~8 minutes to build).
  * `tiny`: 256 / 64, for tests; ~4 s.
6x6 (2x3 boxes), minimal puzzles in their natural mix (8-13 clues, mean 10.1; ~4% with
backtracks > 0), ~2000 puzzles/s:
  * `small6`: 20000 / 1000, for the cpu preset. `tiny6`: 256 / 64, for tests.
4x4: `tiny4`: 64 / 16, for tests (not disjoint, see below).
Splits `train` and `test` are generated with fixed seeds. On 9x9 every test puzzle's solution grid
has a `sudoku.canonical_keys` key that no train solution grid has, so no test puzzle is a symmetry
image of a train puzzle (or even shares its solution grid up to symmetry), and augmenting train
puzzles on the fly cannot produce a test puzzle. Smaller grids have few essentially different
solution grids (6x6: 30 keys among 2000 random grids; 4x4: 2), so there the test puzzles' own keys
avoid the train puzzles' keys; 4x4 has so few essentially different minimal puzzles (35 keys among
300) that its split is not kept disjoint at all. Features: `puzzle` int8 [n*n] (0 = blank),
`solution` int8 [n*n], `backtracks` int32 (search dead ends; 0 = singles solve it), `clues` int32.

Puzzle files (`read_puzzle_file`): one puzzle per line, `PUZZLE` or `PUZZLE<TAB>SOLUTION`, each
n*n characters of 1-n with '.' or '0' for blanks (n = 4, 6, 8 or 9, from the length), optionally
followed by more tab-separated columns (a rating, as public Sudoku sets carry), which are ignored;
blank lines and lines starting with '#' skipped.
"""
from collections.abc import Iterator
import dataclasses
import os
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from core.data import registry
from core.data import tfds_util
from core.data.pipeline import Example
from relay_jax import sudoku

# Seeds per split; the config's own seed is the other word, so configs are independent draws.
_SPLIT_SEEDS = {"train": 0, "test": 1}


@dataclasses.dataclass(eq=False)
class SudokuConfig(tfds.core.BuilderConfig):
  """Grid size, split sizes, the share of puzzles with backtracks > 0, and the seed of both splits."""
  size: int = 9
  num_train: int = 0
  num_test: int = 0
  # About the natural share of minimal 9x9 puzzles, so few are discarded; None: the natural mix.
  hard_share: float | None = 0.6
  seed: int = 0
  max_extra_clues: int = 0  # give each minimal puzzle back U{0..max_extra_clues} clues
  disjoint: bool = True     # test puzzles no symmetry image of a train puzzle (see the docstring)

  @property
  def key_of(self) -> str:
    """Which grids the disjointness compares: solutions on 9x9, puzzles on smaller grids."""
    return "solution" if self.size == 9 else "puzzle"


def add_clues(rng: np.random.Generator, puzzle_Nx81: np.ndarray, solution_Nx81: np.ndarray,
              max_extra: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reveals a uniform 0..max_extra of each puzzle's blanks from its solution (more clues keep the
  solution unique) and re-rates them. Returns (puzzles, solutions, backtracks int32 [N])."""
  n = len(puzzle_Nx81)
  extra_N = rng.integers(0, max_extra + 1, n)
  # Rank each row's blanks in a random order; reveal the extra_N first.
  rank_Nx81 = np.argsort(np.argsort(np.where(puzzle_Nx81 == 0, rng.random(puzzle_Nx81.shape), 2.0),
                                   1), 1)
  reveal = (puzzle_Nx81 == 0) & (rank_Nx81 < extra_N[:, None])
  puzzle_Nx81 = np.where(reveal, solution_Nx81, puzzle_Nx81).astype(np.int8)
  _, _, backtracks_N = sudoku.solve_batch(puzzle_Nx81)
  return puzzle_Nx81, solution_Nx81, backtracks_N.astype(np.int32)


def shared_with(grid_MxC: np.ndarray, train_key_N: np.ndarray) -> np.ndarray:
  """bool [M]: grid m's `canonical_keys` key is among `train_key_N` (uint64 [N])."""
  return np.isin(sudoku.canonical_keys(grid_MxC), train_key_N)


def generate_disjoint(rng: np.random.Generator, n: int, train_key_N: np.ndarray,
                      key_of: str = "solution", max_rounds: int = 20, **kwargs
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`sudoku.generate(rng, n, **kwargs)` with every puzzle whose `key_of` grid ("solution" or
  "puzzle") is `shared_with` the train keys replaced.

  A `hard_share` in kwargs holds per `generate` call, so exactly only if nothing was replaced
  (with random 9x9 grids nothing is: no key of `small`'s 11000 solutions repeats).

  Returns (puzzles int8 [n, C], solutions int8 [n, C], backtracks int32 [n]).
  Raises:
    RuntimeError: `max_rounds` draws in a row kept nothing (the train split covers the space).
  """
  parts, idle = [], 0
  while (have := sum(len(part[0]) for part in parts)) < n:
    drawn = sudoku.generate(rng, n - have, **kwargs)
    keep_m = ~shared_with(drawn[0 if key_of == "puzzle" else 1], train_key_N)
    parts.append(tuple(a[keep_m] for a in drawn))
    idle = 0 if keep_m.any() else idle + 1
    if idle == max_rounds:
      raise RuntimeError(f"{max_rounds} draws found no {key_of} disjoint from the train split's "
                         f"{len(train_key_N)} ({have} of {n} test puzzles found)")
  return tuple(np.concatenate(arrays) for arrays in zip(*parts))


class Sudoku(tfds_util.Builder):
  """Generated Sudoku puzzles with solutions and ratings; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      SudokuConfig(name="small", num_train=10000, num_test=1000, seed=0),
      SudokuConfig(name="graded", num_train=10000, num_test=1000, seed=2, max_extra_clues=30),
      SudokuConfig(name="large", num_train=100000, num_test=2000, seed=3),
      SudokuConfig(name="tiny", num_train=256, num_test=64, seed=1),
      SudokuConfig(name="small6", size=6, num_train=20000, num_test=1000, hard_share=None, seed=4),
      SudokuConfig(name="tiny6", size=6, num_train=256, num_test=64, hard_share=None, seed=5),
      SudokuConfig(name="tiny4", size=4, num_train=64, num_test=16, hard_share=None, seed=6,
                   disjoint=False),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    cells = self.builder_config.size ** 2
    return self.dataset_info(
        {
            "puzzle": tfds_util.tensor((cells,), np.int8),
            "solution": tfds_util.tensor((cells,), np.int8),
            # Raw-bytes scalars: `tfds.features.Scalar` reads int32 back as int64.
            "backtracks": tfds_util.tensor((), np.int32),
            "clues": tfds_util.tensor((), np.int32),
        },
        description=__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    kwargs = dict(size=config.size, hard_share=config.hard_share)
    rng = lambda split: np.random.default_rng([config.seed, _SPLIT_SEEDS[split]])
    train = sudoku.generate(rng("train"), config.num_train, **kwargs)
    if config.disjoint:
      train_keys = sudoku.canonical_keys(train[0 if config.key_of == "puzzle" else 1])
      test = generate_disjoint(rng("test"), config.num_test, train_keys, config.key_of, **kwargs)
    else:
      test = sudoku.generate(rng("test"), config.num_test, **kwargs)
    if config.max_extra_clues:
      clue_rng = lambda split: np.random.default_rng([config.seed, _SPLIT_SEEDS[split], 1])
      train, test = (add_clues(clue_rng(split), *arrays[:2], config.max_extra_clues)
                     for split, arrays in (("train", train), ("test", test)))
    return {"train": self._generate_examples(*train), "test": self._generate_examples(*test)}

  def _generate_examples(self, puzzle_nx81, solution_nx81, backtracks_n):
    for i, (puzzle, solution, backtracks) in enumerate(
        zip(puzzle_nx81, solution_nx81, backtracks_n)):
      yield i, {"puzzle": puzzle, "solution": solution, "backtracks": np.int32(backtracks),
                "clues": np.int32(np.count_nonzero(puzzle))}


registry.register_builder("sudoku", Sudoku)


def random_symmetry(example: Example, rng: np.random.Generator) -> Example:
  """`sudoku.augment` of `puzzle` and `solution`, for `BatchIterator(transform=...)`.

  Acts on one example ([C] each, C = n*n; `BatchIterator` seeds each example's rng by (seed, epoch,
  position), so augmented batches are reproducible) or on a stacked batch ([B, C] each, one
  symmetry per row; seed one Generator per batch, e.g. `np.random.default_rng([seed, step])`),
  which is ~30x cheaper than per example. Other features are kept: symmetries preserve the clue
  count and the solution's uniqueness, though not exactly `backtracks` (the solver's tie-breaks
  follow cell order).
  """
  puzzle, solution = example["puzzle"], example["solution"]
  cells = puzzle.shape[-1]
  puzzle_BxC, solution_BxC = sudoku.augment(rng, puzzle.reshape(-1, cells),
                                            solution.reshape(-1, cells))
  return {**example, "puzzle": puzzle_BxC.reshape(puzzle.shape),
          "solution": solution_BxC.reshape(solution.shape)}


def grid_size(config_name: str) -> int:
  """n of the `sudoku` builder config `config_name` (without building it)."""
  configs = {c.name: c for c in Sudoku.BUILDER_CONFIGS}
  if config_name not in configs:
    raise ValueError(f"no sudoku builder config {config_name!r}; have {sorted(configs)}")
  return configs[config_name].size


class PuzzleLine(NamedTuple):
  number: int                          # line number, from 1
  puzzle: np.ndarray | ValueError      # int8 [n*n], or why the line is bad
  solution: np.ndarray | None          # int8 [n*n], or None when the line has none (or is bad)
  ignored_columns: int                 # tab-separated columns after the solution


def read_puzzle_file(path: str | os.PathLike, size: int | None = None) -> Iterator[PuzzleLine]:
  """Yields a PuzzleLine for each puzzle line of a file (format in the module docstring).

  size: n, when every puzzle must be n x n (a line of another size is a bad line); None takes each
  line's size from its length. A solution must be a complete valid grid of the puzzle's size that
  agrees with the puzzle's clues. Bad lines are reported, not raised, so that a command-line tool
  can name them and go on.
  """
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      fields = line.split("\t")
      try:
        puzzle, solution = _parse_fields(fields[:2], size)
      except ValueError as error:
        puzzle, solution = error, None
      yield PuzzleLine(number, puzzle, solution, max(0, len(fields) - 2))


def _parse_fields(fields: list[str], size: int | None
                  ) -> tuple[np.ndarray, np.ndarray | None]:
  """[PUZZLE] or [PUZZLE, SOLUTION] -> (puzzle [C], solution [C] or None), or ValueError."""
  fields = [f.strip() for f in fields]
  puzzle_C = sudoku.parse_puzzle(fields[0], size)
  if len(fields) == 1:
    return puzzle_C, None
  n = sudoku.size_of(len(puzzle_C))
  try:
    solution_C = sudoku.parse_puzzle(fields[1], n)
  except ValueError as error:
    raise ValueError(f"solution: {error}") from None
  if not sudoku.is_valid_solution(solution_C):
    raise ValueError("solution: not a complete valid grid")
  disagree = np.flatnonzero((puzzle_C != 0) & (puzzle_C != solution_C))
  if disagree.size:
    i = disagree[0]
    raise ValueError(f"solution has {solution_C[i]} where the puzzle's clue is {puzzle_C[i]} "
                     f"(row {i // n + 1}, column {i % n + 1})")
  return puzzle_C, solution_C
