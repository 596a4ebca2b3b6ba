"""The `sudoku` tfds builder, an augmentation transform for `BatchIterator`, and puzzle files.

Stands in for Sudoku-Extreme (HRM's 3.8M / 423k hard puzzles), which cannot be downloaded here:
puzzles come from `sudoku.generate` (minimal puzzles with unique solutions, each from its own
random grid, rated by the solver's backtracks).

BuilderConfigs (train / test puzzles; in each split a `hard_share` of 60% has backtracks > 0):
  * `small`: 10000 / 1000, for the cpu preset; built in 60 s (one process, see
    `sudoku.generate`). Clues 21-29 (mean 24.4); backtracks: median 1, 90th percentile 6, 99th 17.
  * `graded`: 10000 / 1000 from the same kind of minimal puzzles (another seed), each given back
    a uniform 0-30 of its solution's missing digits as extra clues and then re-rated: a mix from
    minimal to easy, which a model trained for minutes on a CPU can make progress on.
  * `large`: 100000 / 2000 minimal puzzles for the paper preset (~8 minutes to build).
  * `tiny`: 256 / 64, for tests; ~4 s.
Splits `train` and `test` are generated with fixed seeds; every test puzzle's solution grid has a
`sudoku.canonical_keys` key that no train solution grid has, so no test puzzle is a symmetry image
of a train puzzle (or even shares its solution grid up to symmetry), and augmenting train puzzles
on the fly cannot produce a test puzzle. Features: `puzzle` int8 [81] (0 = blank), `solution`
int8 [81], `backtracks` int32 (search dead ends; 0 = singles solve it), `clues` int32.

Puzzle files (`read_puzzle_file`): one puzzle per line, `PUZZLE` or `PUZZLE<TAB>SOLUTION`, each
81 characters of 1-9 with '.' or '0' for blanks, optionally followed by more tab-separated columns
(a rating, as public Sudoku sets carry), which are ignored; blank lines and lines starting with '#'
skipped.
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
  """Split sizes, the share of puzzles with backtracks > 0, and the seed of both splits."""
  num_train: int = 0
  num_test: int = 0
  hard_share: float = 0.6  # About the natural share of minimal puzzles, so few are discarded.
  seed: int = 0
  max_extra_clues: int = 0  # give each minimal puzzle back U{0..max_extra_clues} clues


def add_clues(rng: np.random.Generator, puzzle_Nx81: np.ndarray, solution_Nx81: np.ndarray,
              max_extra: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reveals a uniform 0..max_extra of each puzzle's blanks from its solution (more clues keep the
  solution unique) and re-rates them. Returns (puzzles, solutions, backtracks int32 [N])."""
  n = len(puzzle_Nx81)
  extra_N = rng.integers(0, max_extra + 1, n)
  # Rank each row's blanks in a random order; reveal the extra_N first.
  rank_Nx81 = np.argsort(np.argsort(np.where(puzzle_Nx81 == 0, rng.random((n, 81)), 2.0), 1), 1)
  reveal = (puzzle_Nx81 == 0) & (rank_Nx81 < extra_N[:, None])
  puzzle_Nx81 = np.where(reveal, solution_Nx81, puzzle_Nx81).astype(np.int8)
  _, _, backtracks_N = sudoku.solve_batch(puzzle_Nx81)
  return puzzle_Nx81, solution_Nx81, backtracks_N.astype(np.int32)


def shared_with(solution_Mx81: np.ndarray, train_key_N: np.ndarray) -> np.ndarray:
  """bool [M]: solution m's `canonical_keys` key is among `train_key_N` (uint64 [N])."""
  return np.isin(sudoku.canonical_keys(solution_Mx81), train_key_N)


def generate_disjoint(rng: np.random.Generator, n: int, train_key_N: np.ndarray, **kwargs
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`sudoku.generate(rng, n, **kwargs)` with every puzzle `shared_with` the train keys replaced.

  A `hard_share` in kwargs holds per `generate` call, so exactly only if nothing was replaced
  (with random grids nothing is: no key of `small`'s 11000 solutions repeats).

  Returns (puzzles int8 [n, 81], solutions int8 [n, 81], backtracks int32 [n]).
  """
  parts = []
  while (have := sum(len(part[0]) for part in parts)) < n:
    puzzle_mx81, solution_mx81, backtracks_m = sudoku.generate(rng, n - have, **kwargs)
    keep_m = ~shared_with(solution_mx81, train_key_N)
    parts.append((puzzle_mx81[keep_m], solution_mx81[keep_m], backtracks_m[keep_m]))
  return tuple(np.concatenate(arrays) for arrays in zip(*parts))


class Sudoku(tfds_util.Builder):
  """Generated Sudoku puzzles with solutions and ratings; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      SudokuConfig(name="small", num_train=10000, num_test=1000, seed=0),
      SudokuConfig(name="graded", num_train=10000, num_test=1000, seed=2, max_extra_clues=30),
      SudokuConfig(name="large", num_train=100000, num_test=2000, seed=3),
      SudokuConfig(name="tiny", num_train=256, num_test=64, seed=1),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info(
        {
            "puzzle": tfds_util.tensor((81,), np.int8),
            "solution": tfds_util.tensor((81,), np.int8),
            # Raw-bytes scalars: `tfds.features.Scalar` reads int32 back as int64.
            "backtracks": tfds_util.tensor((), np.int32),
            "clues": tfds_util.tensor((), np.int32),
        },
        description=__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    kwargs = dict(hard_share=config.hard_share)
    rng = lambda split: np.random.default_rng([config.seed, _SPLIT_SEEDS[split]])
    train = sudoku.generate(rng("train"), config.num_train, **kwargs)
    test = generate_disjoint(rng("test"), config.num_test, sudoku.canonical_keys(train[1]),
                             **kwargs)
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

  Acts on one example ([81] each; `BatchIterator` seeds each example's rng by (seed, epoch,
  position), so augmented batches are reproducible) or on a stacked batch ([B, 81] each, one
  symmetry per row; seed one Generator per batch, e.g. `np.random.default_rng([seed, step])`),
  which is ~30x cheaper than per example. Other features are kept: symmetries preserve the clue
  count and the solution's uniqueness, though not exactly `backtracks` (the solver's tie-breaks
  follow cell order).
  """
  puzzle, solution = example["puzzle"], example["solution"]
  puzzle_Bx81, solution_Bx81 = sudoku.augment(rng, puzzle.reshape(-1, 81), solution.reshape(-1, 81))
  return {**example, "puzzle": puzzle_Bx81.reshape(puzzle.shape),
          "solution": solution_Bx81.reshape(solution.shape)}


class PuzzleLine(NamedTuple):
  number: int                          # line number, from 1
  puzzle: np.ndarray | ValueError      # int8 [81], or why the line is bad
  solution: np.ndarray | None          # int8 [81], or None when the line has none (or is bad)
  ignored_columns: int                 # tab-separated columns after the solution


def read_puzzle_file(path: str | os.PathLike) -> Iterator[PuzzleLine]:
  """Yields a PuzzleLine for each puzzle line of a file (format in the module docstring).

  A solution must be a complete valid grid that agrees with the puzzle's clues. Bad lines are
  reported, not raised, so that a command-line tool can name them and go on.
  """
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      fields = line.split("\t")
      try:
        puzzle, solution = _parse_fields(fields[:2])
      except ValueError as error:
        puzzle, solution = error, None
      yield PuzzleLine(number, puzzle, solution, max(0, len(fields) - 2))


def _parse_fields(fields: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
  """[PUZZLE] or [PUZZLE, SOLUTION] -> (puzzle [81], solution [81] or None), or ValueError."""
  fields = [f.strip() for f in fields]
  puzzle_81 = sudoku.parse_puzzle(fields[0])
  if len(fields) == 1:
    return puzzle_81, None
  try:
    solution_81 = sudoku.parse_puzzle(fields[1])
  except ValueError as error:
    raise ValueError(f"solution: {error}") from None
  if not sudoku.is_valid_solution(solution_81):
    raise ValueError("solution: not a complete valid grid")
  disagree = np.flatnonzero((puzzle_81 != 0) & (puzzle_81 != solution_81))
  if disagree.size:
    i = disagree[0]
    raise ValueError(f"solution has {solution_81[i]} where the puzzle's clue is {puzzle_81[i]} "
                     f"(row {i // 9 + 1}, column {i % 9 + 1})")
  return puzzle_81, solution_81
