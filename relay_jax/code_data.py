"""`stdlib_bytes`: a byte-level language-modelling corpus cut from the Python standard library.

Every CPython install carries its standard library as `.py` sources, so this corpus needs no
download. It is the fixed list `FILES` of 89 pure-Python files under
`sysconfig.get_paths()["stdlib"]`, each present in CPython 3.11.7, 3.12.1 and 3.13.0. The list
favours ordinary library code of 2-40 KB a file (plus collections/__init__.py and dataclasses.py,
~55 KB); it leaves out generated tables (encodings/*, stringprep.py, pydoc_data/topics.py),
platform build data (_sysconfigdata*), and the largest modules (argparse.py, inspect.py, enum.py,
difflib.py, logging/__init__.py, ast.py, ...) so that the whole dataset builds in a few seconds. A
missing file is an error that names it: the corpus never quietly shrinks. Files are read as raw
bytes (UTF-8 source, comments and docstrings included), nothing normalised.

Split by file, so that no held-out file is seen in training: file i of the sorted `FILES` is `test`
when i % TEST_EVERY == 0 (TEST_EVERY = 10, 9 files: abc.py, collections/__init__.py,
email/iterators.py, glob.py, json/decoder.py, operator.py, reprlib.py, tabnanny.py,
urllib/robotparser.py), `train` otherwise (80 files).

Examples: windows of `seq_len` bytes at offsets 0, seq_len, 2 seq_len, ... of each file, in file
order, in both splits; the last len(file) % seq_len bytes of a file are in no window. (Overlapping
train windows would double the examples, each costing tfds ~0.1 ms to write, without adding text.)
BuilderConfigs `l64` and `l128` set seq_len. Features: `tokens` uint8 [seq_len] (byte values
0..255; models add `MASK_ID` = 256 themselves), `file_index` int32 [] (the file's index in
`FILES`), `offset` int32 [] (where the window starts in that file, so tokens ==
file_bytes[offset:offset + seq_len]).

The files' contents differ between Python versions, so the corpus does too. Measured:
  CPython 3.11.7: train 999,308 bytes (l64: 15,574 windows, l128: 7,763),
                  test 118,964 bytes (l64: 1,854, l128: 925).
  CPython 3.12.1: train 1,010,064 bytes (l64: 15,743, l128: 7,851),
                  test 120,689 bytes (l64: 1,882, l128: 939).
  CPython 3.13.0: train 1,043,350 bytes (l64: 16,264, l128: 8,110),
                  test 132,181 bytes (l64: 2,063, l128: 1,029).
A data_dir keeps whatever the first build read; the DatasetInfo description names the interpreter
and the stdlib folder it was built from.

  source = code_data.load("train", 128)
  print(code_data.decode(source[0]["tokens"]))
"""
import dataclasses
import itertools
import pathlib
import platform
import sysconfig

import numpy as np
import tensorflow_datasets as tfds

from core.data import registry
from core.data import tfds_util

VOCAB_SIZE = 256  # One token per byte value.
MASK_ID = 256  # Outside the byte range; the model's vocabulary is VOCAB_SIZE + 1.
MASK_CHAR = "\u2591"  # How `decode` shows MASK_ID: a light shade, rare in source code.
SEQ_LENS = (64, 128)
TEST_EVERY = 10

# Paths relative to the stdlib folder, in Python's string order ("cProfile.py" < "calendar.py").
FILES = (
    "abc.py", "asyncio/locks.py", "asyncio/queues.py", "bisect.py", "bz2.py", "cProfile.py",
    "calendar.py", "cmd.py", "code.py", "codeop.py", "collections/__init__.py", "colorsys.py",
    "concurrent/futures/_base.py", "concurrent/futures/thread.py", "contextlib.py", "copy.py",
    "copyreg.py", "csv.py", "dataclasses.py", "dbm/dumb.py", "email/iterators.py",
    "email/utils.py", "filecmp.py", "fileinput.py", "fnmatch.py", "fractions.py", "functools.py",
    "genericpath.py", "getopt.py", "getpass.py", "glob.py", "graphlib.py", "hashlib.py",
    "heapq.py", "hmac.py", "html/__init__.py", "html/parser.py", "importlib/util.py", "io.py",
    "json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "json/tool.py",
    "linecache.py", "lzma.py", "multiprocessing/queues.py", "netrc.py", "numbers.py", "opcode.py",
    "operator.py", "posixpath.py", "pprint.py", "pty.py", "py_compile.py", "pyclbr.py",
    "queue.py", "quopri.py", "random.py", "re/__init__.py", "reprlib.py", "rlcompleter.py",
    "runpy.py", "sched.py", "shelve.py", "shlex.py", "sqlite3/dump.py", "stat.py", "string.py",
    "symtable.py", "tabnanny.py", "textwrap.py", "timeit.py", "tokenize.py", "tomllib/_parser.py",
    "tomllib/_re.py", "types.py", "unittest/result.py", "unittest/suite.py", "unittest/util.py",
    "urllib/robotparser.py", "warnings.py", "wsgiref/headers.py", "wsgiref/util.py",
    "xml/etree/ElementPath.py", "xml/sax/saxutils.py", "zipapp.py", "zoneinfo/_common.py",
    "zoneinfo/_tzpath.py",
)


def stdlib_dir() -> pathlib.Path:
  """The running interpreter's standard-library folder (the base install's, also inside a venv)."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def split_files() -> dict[str, list[int]]:
  """Indices into `FILES` of each split's files, ascending."""
  index_f = range(len(FILES))
  return {"train": [i for i in index_f if i % TEST_EVERY],
          "test": [i for i in index_f if i % TEST_EVERY == 0]}


def read_files() -> list[bytes]:
  """The raw bytes of every file of `FILES`, in order.

  Raises:
    FileNotFoundError: naming every file of `FILES` missing from `stdlib_dir()` (e.g. an install
      that ships only .pyc files), rather than building a different corpus.
  """
  root = stdlib_dir()
  missing = [name for name in FILES if not (root / name).is_file()]
  if missing:
    raise FileNotFoundError(
        f"stdlib_bytes needs {len(missing)} file(s) missing from {root} "
        f"(Python {platform.python_version()}): {', '.join(missing)}")
  return [(root / name).read_bytes() for name in FILES]


@dataclasses.dataclass(eq=False)
class StdlibBytesConfig(tfds.core.BuilderConfig):
  seq_len: int = 64


class StdlibBytes(tfds_util.Builder):
  """Byte windows of standard-library sources; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [StdlibBytesConfig(name=f"l{seq_len}", seq_len=seq_len)
                     for seq_len in SEQ_LENS]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info(
        {
            "tokens": tfds_util.tensor((self.builder_config.seq_len,), np.uint8),
            "file_index": tfds_util.tensor((), np.int32),
            "offset": tfds_util.tensor((), np.int32),
        },
        description=(f"{__doc__}\nBuilt from {stdlib_dir()} "
                     f"(Python {platform.python_version()})."))

  def _split_generators(self, dl_manager):
    del dl_manager  # The sources ship with Python.
    data_f = read_files()
    return {split: self._generate_examples(index_f, data_f)
            for split, index_f in split_files().items()}

  def _generate_examples(self, index_f: list[int], data_f: list[bytes]):
    seq_len = self.builder_config.seq_len
    key = 0
    for file_index in index_f:
      byte_n = np.frombuffer(data_f[file_index], np.uint8)
      for offset in range(0, len(byte_n) - seq_len + 1, seq_len):
        yield key, {"tokens": byte_n[offset:offset + seq_len],
                    "file_index": file_index, "offset": offset}
        key += 1


registry.register_builder("stdlib_bytes", StdlibBytes)


def load(split: str, seq_len: int, *, data_dir: str | None = None):
  """`core.data.load("stdlib_bytes", split, config=f"l{seq_len}")`: built on first use.

  Returns a random-access source whose examples are dicts with `tokens` uint8 [seq_len],
  `file_index` int32 [] and `offset` int32 [].
  """
  return registry.load("stdlib_bytes", split, config=f"l{seq_len}", data_dir=data_dir)


def decode(tokens) -> str:
  """Byte tokens [L] (0..255, or MASK_ID) -> text for printing samples.

  Runs of bytes are decoded as UTF-8 with invalid sequences replaced by U+FFFD (a window may cut a
  multi-byte character, and a model may emit any byte); each MASK_ID becomes one `MASK_CHAR`.
  """
  token_l = np.asarray(tokens)
  if token_l.ndim != 1 or (token_l.size and (token_l.min() < 0 or token_l.max() > MASK_ID)):
    raise ValueError(f"tokens must be a 1-D array of values in 0..{MASK_ID}, "
                     f"got shape {token_l.shape}")
  pieces = []
  for masked, run in itertools.groupby(token_l.tolist(), key=lambda t: t == MASK_ID):
    run = list(run)
    pieces.append(MASK_CHAR * len(run) if masked
                  else bytes(run).decode("utf-8", errors="replace"))
  return "".join(pieces)
