"""The program's data: the run's splits and the cached records of every image.

`prepare_data` finds the data (`--data_dir`, else the named `--data`) and splits it
into training clients and held-out evaluation clients; `cache_records` makes sure every
image has its cached record in the form the TFF model reads (embeddings, images in
online mode, the encoder's activations with an adapter), plus the held-out images'
embedding records for central evaluation.
"""

import collections
import dataclasses
from pathlib import Path
from typing import Callable, Optional

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam.data import cache
from tff_sam.data import datasets
from tff_sam.data import discovery
from tff_sam.models import encoders
from tff_sam.models import sam as sam_lib


def prepare_data(config: config_lib.RunConfig, cache_root: Path,
                 skipped: Optional[collections.Counter] = None) -> discovery.DatasetSplits:
  """Finds the data (`data_dir`, else the named dataset) and splits it.

  With `config.skip_bad_examples`, bad files are skipped and counted in `skipped`.
  """
  root = datasets.dataset_root(data_dir=config.data_dir, data=config.data,
                               cache_root=cache_root)
  splits = discovery.discover_splits(
      root, partition=config.partition, num_clients=config.num_clients,
      dirichlet_alpha=config.dirichlet_alpha, test_fraction=config.test_fraction,
      seed=config.seed, skip_bad_examples=config.skip_bad_examples, skipped=skipped)
  if not splits.test:
    raise errors.ConfigError(
        "test_fraction", f"no held-out test images in {root} (add a test/ folder or set "
        "--test_fraction > 0 with at least 2 images)")
  if splits.validation and config.validation_fraction > 0:
    raise errors.ConfigError(
        "validation_fraction", f"{root / discovery.VALIDATION_DIR} holds the validation "
        "images; drop --validation_fraction (or that folder)")
  splits = discovery.hold_out_validation(splits, fraction=config.validation_fraction,
                                         seed=config.seed)
  if config.validation_fraction > 0 and not splits.validation:
    raise errors.ConfigError(
        "validation_fraction", f"no training client of {root} has 2 or more images, so "
        "none can spare one for validation (drop --validation_fraction)")
  if config.test_every_eval and not splits.validation:
    raise errors.ConfigError(
        "test_every_eval", "is set but there is no validation (no --validation_fraction "
        f"and no {discovery.VALIDATION_DIR}/ folder in {root}): drop it")
  splits = discovery.limit_labels(splits, per_client=config.labels_per_site, seed=config.seed)
  return discovery.select_clients(splits, train_clients=config.train_clients,
                                  pool=config.pool_clients)


@dataclasses.dataclass(frozen=True)
class RunRecords:
  """The run's cached records.

  Attributes:
    clients: Training client -> its records.
    test: Held-out embedding records (central evaluation).
    federated_test: Held-out records in the TFF model's input format (federated
      evaluation, and an adapted encoder's central evaluation): image records in
      online mode, feature records with an adapter and the cache, else `test`.
    stats: The cache's counts.
    validation: Training client -> its validation records, in the TFF model's input
      format (federated evaluation only).
  """

  clients: dict[str, list[cache.Record]]
  test: list[cache.Record]
  federated_test: list[cache.Record]
  stats: cache.CacheStats
  validation: dict[str, list[cache.Record]]


def cache_records(config: config_lib.RunConfig, splits: discovery.DatasetSplits,
                bundle: sam_lib.SamBundle, cache_root: Path, skipped: collections.Counter,
                log: Callable[[str], None], *, feature_start: Optional[int]) -> RunRecords:
  """Caches every client's and every test image.

  Clients' records hold what the TFF model reads: embeddings, images (online) or,
  with an adapter and the cache, the encoder's activations at `feature_start`. Test
  images also get embedding records (central evaluation of the frozen encoder).
  """
  stats = cache.CacheStats(skipped=dict(skipped))
  encode = dict(bundle=bundle, cache_root=cache_root, binary_components=config.binary_components,
                batch_size=config.encode_batch_size, skip_bad_examples=config.skip_bad_examples)
  online = not config.embedding_cache
  model_input = dict(online=online, feature_start=feature_start)
  client_records = {}
  for client, examples in splits.clients.items():
    client_records[client], s = cache.build_records(
        examples, desc=f"encoding {client}", **model_input, **encode)
    stats.add(s)
  validation_records = {}
  for client, examples in splits.validation.items():
    validation_records[client], s = cache.build_records(
        examples, desc=f"encoding {client} (validation)", **model_input, **encode)
    stats.add(s)
  test_records, s = cache.build_records(list(splits.test), desc="encoding test", **encode)
  stats.add(s)
  fed_test_records = test_records
  if online or feature_start is not None:
    fed_test_records, _ = cache.build_records(list(splits.test), desc="test inputs",
                                              **model_input, **encode)
  what = ("images (online mode)" if online else "embeddings" if feature_start is None else
          "encoder features (" + encoders.describe_start(sam_lib.encoder_kind(bundle),
                                                         feature_start)
          + ", where the adapters start)")
  log(f"{what}: {stats.encoded} computed, "
      f"{stats.reused} reused from the cache; "
      f"{stats.objects} objects, {stats.images_without_objects} images without objects, "
      f"{stats.num_skipped} bad examples skipped")
  return RunRecords(clients=client_records, test=test_records,
                    federated_test=fed_test_records, stats=stats,
                    validation=validation_records)
