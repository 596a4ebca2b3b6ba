"""The base class of every tensorflow-datasets builder in `core/data`.

tfds 4.9.10 builds and reads these datasets without TensorFlow, given three
workarounds kept here rather than in each builder:
  * The file format must be `array_record` (`make_builder`): the default
    TFRecord writer imports TensorFlow when it finalises a split.
  * `DatasetInfo` is constructed directly (`Builder.dataset_info`):
    `dataset_info_from_configs` reads README/CITATIONS files from a per-dataset
    package folder, which these single-module builders do not have.
  * `code_path` is overridden: tfds's version tests
    `isinstance(path, importlib_resources.abc.Traversable)` for any builder
    defined in a package, but only declares `importlib_resources` as a
    dependency on Python < 3.9, so on 3.11 it raises ModuleNotFoundError.
Array features are stored as raw bytes (`tensor`): tfds's default encoding
writes every element as an int64/float proto value through Python, which made
a 40 MB image config take ~10 s to write instead of ~1 s.
Downloads are never needed (the data comes from installed packages) and tfds's
GCS look-ups are off by default, so no `download_config` is needed.
"""
import inspect
from typing import Any, Mapping

from etils import epath
import tensorflow_datasets as tfds

FILE_FORMAT = 'array_record'


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A `GeneratorBasedBuilder` that works without TensorFlow (see module doc)."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # What tfds itself returns for a builder in a package on disk.
    return epath.Path(inspect.getfile(cls))

  def dataset_info(
      self, features: Mapping[str, Any], description: str
  ) -> tfds.core.DatasetInfo:
    """The `DatasetInfo` of this builder with the given feature dict.

    Shuffling is disabled so that record i of a split is the i-th generated
    example: the generators already draw in a random order where it matters,
    the input pipeline shuffles on its own, and tests can reason about order.
    """
    return tfds.core.DatasetInfo(
        builder=self,
        description=description,
        features=tfds.features.FeaturesDict(dict(features)),
        disable_shuffling=True,
    )


def tensor(shape: tuple[int, ...], dtype: type) -> tfds.features.Tensor:
  """A fixed-shape array feature stored as raw bytes (see module docstring)."""
  return tfds.features.Tensor(shape=shape, dtype=dtype,
                              encoding=tfds.features.Encoding.BYTES)


def make_builder(builder_cls: type[Builder], config: str,
                 data_dir: str) -> Builder:
  """Instantiates `builder_cls` for `config` in `data_dir`, array_record format."""
  return builder_cls(config=config, data_dir=data_dir, file_format=FILE_FORMAT)
