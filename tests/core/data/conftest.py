"""One fresh data_dir per test session, so builds are tested, not a prebuilt cache."""
import pytest


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp('tfds'))
