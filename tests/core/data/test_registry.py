"""`load`: validation, defaults, concurrent builds, and no TensorFlow."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import core.data
from core.data import registry

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]


def test_load_gives_random_access_dicts_of_arrays(data_dir, rng):
  source = core.data.load('digits', 'train', config='r16', data_dir=data_dir)
  i = rng.integers(len(source))
  example = source[i]
  assert set(example) == {'image', 'label', 'index'}
  assert example['image'].shape == (16, 16, 1)
  assert len(core.data.load('digits', 'train[:10]', config='r16',
                            data_dir=data_dir)) == 10


def test_config_none_means_the_first_config(data_dir):
  source = core.data.load('digits', 'test', config=None, data_dir=data_dir)
  assert source[0]['image'].shape == (16, 16, 1)
  assert core.data.config_names('digits') == ['r16', 'r32']


@pytest.mark.parametrize('kwargs, listed', [
    (dict(name='mnist', split='train', config=None), 'image_crops'),
    (dict(name='image_crops', split='train', config='s33'), 's256'),
    (dict(name='digits', split='validation', config='r16'), 'test'),
])
def test_bad_names_list_the_choices(data_dir, kwargs, listed):
  with pytest.raises(ValueError, match=listed):
    core.data.load(kwargs.pop('name'), kwargs.pop('split'), data_dir=data_dir,
                   **kwargs)


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', '/some/where')
  assert core.data.default_data_dir() == '/some/where'
  monkeypatch.delenv('TFDS_DATA_DIR')
  assert core.data.default_data_dir() == str(_REPO_ROOT / '.cache' / 'tfds')


def test_builds_and_reads_without_tensorflow(data_dir):
  core.data.load('image_crops', 'eval', config='s16', data_dir=data_dir)[0]
  assert 'tensorflow' not in sys.modules


_CHILD = """
import json, sys
import core.data
source = core.data.load('digits', 'test', config='r32', data_dir=sys.argv[1])
print(json.dumps({'labels': [int(source[i]['label']) for i in range(len(source))],
                  'tensorflow': 'tensorflow' in sys.modules}))
"""


def test_two_processes_racing_to_build_both_succeed(tmp_path, data_dir):
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      [str(_REPO_ROOT), *filter(None, [os.environ.get('PYTHONPATH')])])}
  children = [subprocess.Popen([sys.executable, '-c', _CHILD, str(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env, text=True) for _ in range(2)]
  results = []
  for child in children:
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    results.append(json.loads(out.strip().splitlines()[-1]))
  assert results[0] == results[1]
  # Builds are reproducible: the session's own build holds the same labels.
  ours = core.data.load('digits', 'test', config='r32', data_dir=data_dir)
  assert results[0]['labels'] == [int(ours[i]['label']) for i in range(len(ours))]
  assert not results[0]['tensorflow']
  # Exactly one finished build, and no leftover temporary folder.
  assert sorted(p.name for p in (tmp_path / 'digits').iterdir()
                if not p.name.startswith('.')) == ['r32']
  assert [p.name for p in (tmp_path / 'digits' / 'r32').iterdir()] == ['1.0.0']


def test_builders_are_all_registered():
  # Method packages register more (sudoku, stdlib_bytes) when they are imported.
  assert {'image_crops', 'digits', 'two_d'} <= set(registry.BUILDERS)
  for name, cls in registry.BUILDERS.items():
    assert cls.name == name


def test_check_config_and_crop_size_take_fixed_and_folder_configs(tmp_path):
  core.data.check_config('image_crops', 's64')
  assert core.data.crop_size('image_crops', 's128') == 128
  with pytest.raises(ValueError, match=r"config.data.eval_config='s48'; expected one of"):
    core.data.check_config('image_crops', 's48', 'config.data.eval_config')
  core.data.check_config('image_folder', f's96x4:{tmp_path}')      # a folder config string
  assert core.data.crop_size('image_folder', f's96x4:{tmp_path}') == 96
  with pytest.raises(ValueError, match="is not a folder"):
    core.data.check_config('image_folder', f's96:{tmp_path}/missing')
  with pytest.raises(ValueError, match="config.data.name must be one of"):
    core.data.check_config('nope', 's64')
  with pytest.raises(ValueError, match="does not name a crop size"):
    core.data.crop_size('digits', 'r16')
