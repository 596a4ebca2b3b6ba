"""`load`: build a dataset of this package on first use and open it for reading."""
import contextlib
import fcntl
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from core.data import digits
from core.data import image_crops
from core.data import image_folder
from core.data import pipeline
from core.data import tfds_util
from core.data import two_d

BUILDERS: dict[str, type[tfds_util.Builder]] = {
    'image_crops': image_crops.ImageCrops,
    'image_folder': image_folder.ImageFolder,
    'digits': digits.Digits,
    'two_d': two_d.TwoD,
}
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def register_builder(name: str, builder_cls: type[tfds_util.Builder]) -> None:
  """Adds `builder_cls` to `BUILDERS` as `name`, so `load(name, ...)` finds it.

  Method packages call this when imported, so core never imports them.
  Registering the same class again is a no-op.
  """
  if BUILDERS.get(name, builder_cls) is not builder_cls:
    raise ValueError(f'dataset {name!r} is already registered as '
                     f'{BUILDERS[name].__name__}')
  if builder_cls.name != name:
    # `load` reads the dataset back through tfds under `builder_cls.name`.
    raise ValueError(f'{builder_cls.__name__} is named {builder_cls.name!r} '
                     f'by tfds, not {name!r}')
  BUILDERS[name] = builder_cls


def default_data_dir() -> str:
  """`$TFDS_DATA_DIR` if set, else `<repo root>/.cache/tfds` (git-ignored)."""
  return os.environ.get('TFDS_DATA_DIR') or str(_REPO_ROOT / '.cache' / 'tfds')


def config_names(name: str) -> list[str]:
  """The BuilderConfig names of dataset `name`."""
  if name not in BUILDERS:
    raise ValueError(f'name must be one of {sorted(BUILDERS)}, got {name!r}')
  return [c.name for c in BUILDERS[name].BUILDER_CONFIGS]


def check_config(name: str, config: str, field: str = "config.data.config") -> None:
  """ValueError naming `field` and the valid choices unless `config` is one of dataset `name`'s
  configs (or, for a builder that makes configs from strings like image_folder, a valid string)."""
  if name not in BUILDERS:
    raise ValueError(f'config.data.name must be one of {sorted(BUILDERS)}, got {name!r}')
  from_name = getattr(BUILDERS[name], 'config_from_name', None)
  if from_name is not None:
    from_name(config)                  # raises, naming what is wrong with the string
  elif config not in config_names(name):
    raise ValueError(f'{field}={config!r}; expected one of {config_names(name)}')


def crop_size(name: str, config: str) -> int:
  """The side in pixels of the square images of an image dataset's config (image_crops' `s<S>`,
  image_folder's `s<S>[x<N>]:<folder>`)."""
  from_name = getattr(BUILDERS.get(name), 'config_from_name', None)
  if from_name is not None:
    return int(from_name(config).crop_size)
  if not str(config).startswith('s') or not str(config)[1:].isdigit():
    raise ValueError(f'{name} config {config!r} does not name a crop size (expected s<size>)')
  return int(str(config)[1:])


@contextlib.contextmanager
def _file_lock(path: str):
  """Holds an exclusive flock on `path` (created if missing)."""
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def load(name: str, split: str, *, config: str | None = None,
         data_dir: str | None = None):
  """Random-access source of `name/config` `split`, built into `data_dir` if missing.

  Args:
    name: one of `BUILDERS` ('image_crops', 'image_folder', 'digits', ...).
    split: a split of that dataset; tfds slicing such as 'train[:100]' works.
    config: a BuilderConfig name (e.g. 's32', 'r16', 'double_ring'); None means
      the dataset's first config; image_folder: 's<size>[x<n>]:<folder>'.
    data_dir: where datasets live; None means `default_data_dir()`.

  Returns:
    `tfds.data_source(...)`'s result: supports len(), `source[i]` and
    `source.__getitems__(indices)`, giving dicts of numpy arrays.
  """
  config = _builder_config(name, config)
  data_dir = data_dir or default_data_dir()
  os.makedirs(data_dir, exist_ok=True)
  # tfds writes into a temporary folder and renames it, but a second process
  # racing on the same dataset fails at that rename (and both write the
  # dataset's shared default-config file), so processes take turns per dataset.
  with _file_lock(os.path.join(data_dir, f'.{name}.lock')):
    builder = tfds_util.make_builder(BUILDERS[name], config, data_dir)
    builder.download_and_prepare()
  splits = sorted(builder.info.splits)
  config_name = builder.builder_config.name
  if split.split('[')[0] not in splits:
    raise ValueError(f'split of {name}/{config_name} must be one of {splits}, '
                     f'got {split!r}')
  return tfds.data_source(f'{name}/{config_name}', split=split,
                          data_dir=data_dir)


def _builder_config(name: str, config: str | None):
  """`config` checked against `name`'s configs: the name itself, or for a
  builder with `config_from_name` (image_folder) the config it makes."""
  configs = config_names(name)
  parse = getattr(BUILDERS[name], 'config_from_name', None)
  if parse is not None and config not in configs:
    return parse(config)
  config = configs[0] if config is None else config
  if config not in configs:
    raise ValueError(f'config of {name!r} must be one of {configs}, '
                     f'got {config!r}')
  return config


def load_in_memory(name: str, split: str, *, config: str | None = None,
                   data_dir: str | None = None) -> pipeline.InMemorySource:
  """`load(...)` read whole into numpy arrays, cached beside the dataset.

  Decoding tfds records one by one takes seconds for the larger splits (65536
  two_d points: ~7 s); the decoded arrays are saved once as
  `<dataset dir>/<split>.npz` and every later call reads that file instead.
  """
  source = load(name, split, config=config, data_dir=data_dir)
  data_dir = data_dir or default_data_dir()
  builder = tfds_util.make_builder(BUILDERS[name], _builder_config(name, config),
                                   data_dir)
  cache = os.path.join(builder.data_dir, f'{split}.npz')
  with _file_lock(os.path.join(data_dir, f'.{name}.lock')):
    if not os.path.exists(cache):
      arrays = pipeline.InMemorySource(source).arrays
      tmp = cache + f'.{os.getpid()}.tmp.npz'
      np.savez(tmp, **arrays)
      os.replace(tmp, cache)
  with np.load(cache) as f:
    return pipeline.InMemorySource(arrays={k: f[k] for k in f.files})
