"""relay_jax.code_data: the `stdlib_bytes` builder against the stdlib files read here directly."""
import pathlib
import sysconfig

import numpy as np
import pytest

from core.data import pipeline
from relay_jax import code_data

_STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
  # A fresh folder, so the build itself is tested rather than a cached dataset.
  return str(tmp_path_factory.mktemp("tfds"))


def test_file_list_is_sorted_unique_and_present():
  assert list(code_data.FILES) == sorted(set(code_data.FILES))
  assert 60 <= len(code_data.FILES) <= 150
  for name in code_data.FILES:
    assert (_STDLIB / name).is_file(), name


def test_split_is_a_fixed_partition_of_the_files():
  index_f = code_data.split_files()
  assert index_f["test"] == list(range(0, len(code_data.FILES), code_data.TEST_EVERY))
  assert sorted(index_f["train"] + index_f["test"]) == list(range(len(code_data.FILES)))


def test_a_missing_file_is_named(monkeypatch):
  monkeypatch.setattr(code_data, "FILES", code_data.FILES + ("no_such_module.py",))
  with pytest.raises(FileNotFoundError, match="no_such_module.py"):
    code_data.read_files()


@pytest.mark.parametrize("seq_len", code_data.SEQ_LENS)
def test_windows_are_the_files_bytes(data_dir, seq_len):
  data_f = [(_STDLIB / name).read_bytes() for name in code_data.FILES]
  seen_files = {}
  for split, index_f in code_data.split_files().items():
    arrays = pipeline.InMemorySource(code_data.load(split, seq_len, data_dir=data_dir)).arrays
    token_nxl, file_n, offset_n = arrays["tokens"], arrays["file_index"], arrays["offset"]
    assert token_nxl.shape == (sum(len(data_f[f]) // seq_len for f in index_f), seq_len)
    assert token_nxl.dtype == np.uint8
    assert file_n.dtype == np.int32 and offset_n.dtype == np.int32
    # Every whole window of every file of the split, each exactly once, in file order.
    expected = [(f, o) for f in index_f for o in range(0, len(data_f[f]) - seq_len + 1, seq_len)]
    assert list(zip(file_n.tolist(), offset_n.tolist())) == expected
    for token_l, f, o in zip(token_nxl, file_n, offset_n):
      assert token_l.tobytes() == data_f[f][o:o + seq_len]
    seen_files[split] = set(file_n.tolist())
  assert seen_files["train"].isdisjoint(seen_files["test"])


def test_unknown_seq_len_lists_the_configs(data_dir):
  with pytest.raises(ValueError, match="l128"):
    code_data.load("train", 96, data_dir=data_dir)


def test_decode_round_trips_ascii_and_shows_masks():
  text = "def f(x):\n  return x + 1  # ~\t"
  token_l = np.frombuffer(text.encode("ascii"), np.uint8)
  assert code_data.decode(token_l) == text
  masked_l = np.array([ord("a"), code_data.MASK_ID, code_data.MASK_ID, ord("b")])
  assert code_data.decode(masked_l) == "a" + 2 * code_data.MASK_CHAR + "b"
  # A window may cut a multi-byte character: the stray byte becomes U+FFFD.
  assert code_data.decode(np.array([0xC3, ord("a")])) == "\ufffda"
  with pytest.raises(ValueError, match="0..256"):
    code_data.decode(np.array([257]))
