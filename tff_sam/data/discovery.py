"""Finding and splitting image/mask pairs on disk.

Layout of `--data_dir`:

* flat: `images/` and `masks/` with matching file stems; or
* natural: one sub-folder per site, each with `images/` and `masks/`; each site is
  one federated client.

Validation images, for model selection (`DatasetSplits.validation`), come from a
`val/` sub-folder when there is one: `val/<site>/` (images/ + masks/) per training
site of the natural layout, or a flat `val/` (images/ + masks/) split evenly over the
flat layout's clients by seed. Without it, a validation fraction
(`hold_out_validation`) holds that share of every training client's images out of
training, chosen by seed apart from the test split.

Either may have a `test/` sub-folder that is held out: flat (`test/images/` +
`test/masks/`) or one sub-folder per held-out site (`test/<site>/images/` + `masks/`).
Without it, `--test_fraction` of the images (from every site) is held out. The held-out
images are also grouped into evaluation clients (`DatasetSplits.test_clients`) for
federated evaluation: one per `test/<site>/` folder, one per training site for a
held-out fraction of the natural layout, else a single client `test`.

What the files may hold is in `reading`.

Bad examples (docs/DATA_FAULTS.md): by default every problem with a file raises a
one-line `errors.DataError` naming the file. With `skip_bad_examples=True`, problems
that concern one example (an unpaired file, a duplicate stem here; an unreadable file,
a size mismatch, non-integer mask values, a lossy (JPEG) or colour mask in
`cache.build_records`) skip that example with a one-line warning and count it under a
reason key (`SKIP_REASONS`).
Folder-level problems (missing folder, no images at all) are always errors.
"""

import collections
import dataclasses
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tff_sam import errors

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
TEST_DIR = "test"
VALIDATION_DIR = "val"
# Seeds `hold_out_validation`'s random stream next to the run's seed.
_VALIDATION_STREAM = 1
_LABELS_STREAM = 2  # And `limit_labels`'s.
# The one client `select_clients(pool=True)` puts every training image into.
POOLED_CLIENT = "pooled"

_LOG = logging.getLogger(__name__)

# Why an example was skipped (keys of the `skipped` counts).
UNREADABLE = "unreadable"              # corrupt, truncated or not an image file
UNSUPPORTED_SHAPE = "unsupported_shape"  # e.g. a multi-frame stack, 2 channels
SIZE_MISMATCH = "size_mismatch"        # mask and image differ in height/width
BAD_MASK_VALUES = "bad_mask_values"    # non-integer, NaN, negative or > int32 labels
UNPAIRED = "unpaired"                  # image without mask, or mask without image
DUPLICATE_STEM = "duplicate_stem"      # two files with one stem in images/ or masks/
LOSSY_MASK = "lossy_mask"              # a JPEG or WebP mask (compression alters labels)
COLOUR_MASK = "colour_mask"            # RGB(A) mask with differing channels or alpha
TOO_THIN = "too_thin"                  # a side that SAM's resize would make 0 pixels
SKIP_REASONS = (UNREADABLE, UNSUPPORTED_SHAPE, SIZE_MISMATCH, BAD_MASK_VALUES, UNPAIRED,
                DUPLICATE_STEM, LOSSY_MASK, COLOUR_MASK, TOO_THIN)


class ExampleError(errors.DataError):
  """A `DataError` about one example, which `skip_bad_examples=True` skips.

  Attributes:
    reason: One of `SKIP_REASONS`.
  """

  def __init__(self, path: object, message: str, *, reason: str):
    super().__init__(path, message)
    self.reason = reason


def skip_example(error: ExampleError, skipped: Optional[collections.Counter]) -> None:
  """Logs one warning line for a skipped example and counts it under its reason."""
  _LOG.warning("skipping bad example (%s): %s", error.reason, error)
  if skipped is not None:
    skipped[error.reason] += 1


@dataclasses.dataclass(frozen=True)
class Example:
  """One image and its mask file."""

  stem: str
  image_path: Path
  mask_path: Path


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
  """Training data per client and the held-out test examples.

  Attributes:
    clients: Client id -> its examples, in a deterministic order.
    test_clients: Evaluation client id -> its held-out examples (no client trains on
      them); see the module docstring for how they are grouped.
    natural: True when clients are the data's own site folders.
    validation: Training client -> its validation examples: its `val/` folder's, or
      held out of its training examples (`hold_out_validation`); empty without
      validation.
  """

  clients: dict[str, tuple[Example, ...]]
  test_clients: dict[str, tuple[Example, ...]]
  natural: bool
  validation: dict[str, tuple[Example, ...]] = dataclasses.field(default_factory=dict)

  @property
  def test(self) -> tuple[Example, ...]:
    """All held-out examples, evaluation client by client."""
    return tuple(e for exs in self.test_clients.values() for e in exs)

  @property
  def num_train_examples(self) -> int:
    return sum(len(v) for v in self.clients.values())


def _files_by_stem(folder: Path) -> dict[str, list[Path]]:
  """Supported files of `folder` by stem (several paths = a duplicate stem)."""
  by_stem: dict[str, list[Path]] = {}
  for path in sorted(folder.iterdir()):
    if path.name.startswith(".") or not path.is_file():
      continue
    if path.suffix.lower() not in IMAGE_SUFFIXES:
      continue
    by_stem.setdefault(path.stem, []).append(path)
  return by_stem


def _duplicate_error(paths: list[Path]) -> ExampleError:
  others = ", ".join(p.name for p in paths[:-1])
  return ExampleError(
      paths[-1], f"duplicate stem {paths[-1].stem!r} (also {others}); keep one file per stem",
      reason=DUPLICATE_STEM)


def list_examples(folder: Path, *, skip_bad_examples: bool = False,
                  skipped: Optional[collections.Counter] = None) -> list[Example]:
  """Pairs `folder/images/*` with `folder/masks/*` by file stem.

  Args:
    folder: A folder with `images/` and `masks/` sub-folders.
    skip_bad_examples: Skip (with a warning) instead of raising for an image without
      a mask, a mask without an image (reason `unpaired`, one count per file) and a
      stem with several files in `images/` or `masks/` (reason `duplicate_stem`: none
      of that stem's files is used, since which one the mask belongs to is unknown;
      one count per stem).
    skipped: If given, skipped examples are counted here by reason.

  Returns:
    Examples sorted by stem.

  Raises:
    errors.DataError: A missing sub-folder, no images, no usable pair left after
      skipping, or (without `skip_bad_examples`) an unpaired file or a duplicate stem
      (an `ExampleError`).
  """
  folder = Path(folder)
  images_dir, masks_dir = folder / "images", folder / "masks"
  for d in (images_dir, masks_dir):
    if not d.is_dir():
      raise errors.DataError(d, "folder not found (expected images/ and masks/ side by side)")
  images = _files_by_stem(images_dir)
  masks = _files_by_stem(masks_dir)
  if not images:
    raise errors.DataError(images_dir, f"no images found (looked for {', '.join(IMAGE_SUFFIXES)})")

  problems: list[ExampleError] = []
  for stem in sorted(set(images) | set(masks)):
    dups = [paths for paths in (images.get(stem, []), masks.get(stem, [])) if len(paths) > 1]
    if dups:
      problems.append(_duplicate_error(dups[0]))
    elif stem not in masks:
      problems.append(ExampleError(
          images[stem][0], f"image has no mask (expected {masks_dir}/{stem}.png or .tif)",
          reason=UNPAIRED))
    elif stem not in images:
      problems.append(ExampleError(
          masks[stem][0], f"mask has no image (expected {images_dir}/{stem}.*)",
          reason=UNPAIRED))
  if problems and not skip_bad_examples:
    # Same precedence as before: duplicates, then images without masks, then masks.
    problems.sort(key=lambda e: (e.reason != DUPLICATE_STEM, Path(e.path).parent != images_dir))
    raise problems[0]
  for problem in problems:
    skip_example(problem, skipped)
  bad = {Path(p.path).stem for p in problems}
  examples = [Example(s, images[s][0], masks[s][0]) for s in sorted(images) if s not in bad]
  if not examples:
    raise errors.DataError(
        folder, f"no usable image/mask pairs ({len(problems)} bad examples skipped)")
  return examples


def partition_iid(examples: Sequence[Example], *, num_clients: int,
                  rng: np.random.Generator) -> list[list[Example]]:
  """Shuffles and splits examples into `num_clients` near-equal shards."""
  if num_clients > len(examples):
    raise errors.ConfigError(
        "num_clients", f"{num_clients} clients but only {len(examples)} training images")
  order = rng.permutation(len(examples))
  return [[examples[i] for i in shard] for shard in np.array_split(order, num_clients)]


def partition_dirichlet(examples: Sequence[Example], *, num_clients: int, alpha: float,
                        rng: np.random.Generator) -> list[list[Example]]:
  """Quantity-skewed split: client shares ~ Dirichlet(alpha), every client >= 1 image."""
  n = len(examples)
  if num_clients > n:
    raise errors.ConfigError(
        "num_clients", f"{num_clients} clients but only {n} training images")
  shares = rng.dirichlet(np.full(num_clients, alpha))
  extra = (n - num_clients) * shares
  counts = 1 + np.floor(extra).astype(int)
  remainder = n - counts.sum()
  for i in np.argsort(-(extra - np.floor(extra)))[:remainder]:
    counts[i] += 1
  order = rng.permutation(n)
  bounds = np.concatenate([[0], np.cumsum(counts)])
  return [[examples[i] for i in order[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]


def _hold_out(examples: list[Example], fraction: float,
              rng: np.random.Generator) -> tuple[list[Example], list[Example]]:
  if fraction <= 0 or len(examples) < 2:
    return examples, []
  n_test = min(len(examples) - 1, max(1, int(round(fraction * len(examples)))))
  order = rng.permutation(len(examples))
  test = sorted((examples[i] for i in order[:n_test]), key=lambda e: e.stem)
  train = sorted((examples[i] for i in order[n_test:]), key=lambda e: e.stem)
  return train, test


def discover_splits(data_dir: Path, *, partition: str, num_clients: int,
                    dirichlet_alpha: float, test_fraction: float, seed: int,
                    skip_bad_examples: bool = False,
                    skipped: Optional[collections.Counter] = None) -> DatasetSplits:
  """Finds the data under `data_dir` and splits it into clients and a test set.

  Args:
    data_dir: Root folder (see the module docstring for the layout).
    partition: `iid` or `dirichlet`; used only for the flat layout.
    num_clients: Number of clients for the flat layout.
    dirichlet_alpha: Concentration for `dirichlet` (smaller = more skewed).
    test_fraction: Fraction of images held out when there is no `test/` folder.
    seed: Makes the split deterministic.
    skip_bad_examples: Passed to `list_examples` for every folder.
    skipped: Passed to `list_examples`: counts of skipped examples by reason.

  Returns:
    The splits.

  Raises:
    errors.DataError: The folder is missing, empty, or not in a known layout, or a
      bad example (see `list_examples`).
  """
  listing = dict(skip_bad_examples=skip_bad_examples, skipped=skipped)
  root = Path(data_dir)
  if not root.is_dir():
    raise errors.DataError(root, "data directory not found")
  rng = np.random.default_rng(seed)
  test_folder = root / TEST_DIR
  fixed_test = list_test_clients(test_folder, **listing) if test_folder.is_dir() else None

  if (root / "images").is_dir() or (root / "masks").is_dir():
    train = list_examples(root, **listing)
    test_clients = fixed_test
    if test_clients is None:
      train, test = _hold_out(train, test_fraction, rng)
      test_clients = {TEST_DIR: tuple(test)} if test else {}
    if partition == "iid":
      shards = partition_iid(train, num_clients=num_clients, rng=rng)
    else:
      shards = partition_dirichlet(train, num_clients=num_clients, alpha=dirichlet_alpha, rng=rng)
    clients = {f"client_{i:03d}": tuple(sorted(s, key=lambda e: e.stem))
               for i, s in enumerate(shards)}
    return _with_validation_folder(
        DatasetSplits(clients=clients, test_clients=test_clients, natural=False),
        root / VALIDATION_DIR, seed=seed, listing=listing)

  sites = _site_folders(root)
  if not sites:
    raise errors.DataError(
        root, "no images/ and masks/ folders found (expected images/ + masks/, "
        "or one sub-folder per site each with images/ + masks/)")
  clients, test_clients = {}, dict(fixed_test or {})
  for site in sites:
    examples = list_examples(site, **listing)
    if fixed_test is None:
      examples, held = _hold_out(examples, test_fraction, rng)
      if held:
        test_clients[site.name] = tuple(held)
    clients[site.name] = tuple(examples)
  return _with_validation_folder(
      DatasetSplits(clients=clients, test_clients=test_clients, natural=True),
      root / VALIDATION_DIR, seed=seed, listing=listing)


def _with_validation_folder(splits: DatasetSplits, folder: Path, *, seed: int,
                            listing: dict) -> DatasetSplits:
  """`splits` with the validation examples of `folder` (`val/`), if it exists.

  Natural layout: `val/<site>/` per training site (not every site needs one); flat:
  `val/images/` + `val/masks/`, split evenly over the clients by seed.

  Raises:
    errors.DataError: `val/<name>/` names no training site, or a layout mismatch.
  """
  if not folder.is_dir():
    return splits
  if not splits.natural:
    if not (folder / "images").is_dir():
      raise errors.DataError(folder, "with flat training data (images/ + masks/) the "
                             "validation folder is flat too: val/images/ + val/masks/")
    examples = list_examples(folder, **listing)
    rng = np.random.default_rng([seed, _VALIDATION_STREAM])
    order = rng.permutation(len(examples))
    shards = np.array_split(order, len(splits.clients))
    validation = {c: tuple(sorted((examples[i] for i in shard), key=lambda e: e.stem))
                  for c, shard in zip(splits.clients, shards) if len(shard)}
    return dataclasses.replace(splits, validation=validation)
  if (folder / "images").is_dir():
    raise errors.DataError(folder, "with one training folder per site, validation images "
                           f"go in {VALIDATION_DIR}/<site>/images/ + masks/, per site")
  by_site = list_test_clients(folder, **listing)
  for name in by_site:
    if name not in splits.clients:
      raise errors.DataError(folder / name, "no training site of that name (validation "
                             f"images belong to a training site: {VALIDATION_DIR}/<site>/ "
                             f"with one of {', '.join(sorted(splits.clients))})")
  return dataclasses.replace(splits, validation={c: v for c, v in by_site.items() if v})


def _site_folders(root: Path) -> list[Path]:
  return sorted(d for d in root.iterdir()
                if d.is_dir() and d.name not in (TEST_DIR, VALIDATION_DIR)
                and not d.name.startswith(".")
                and ((d / "images").is_dir() or (d / "masks").is_dir()))


def list_test_clients(folder: Path, *, skip_bad_examples: bool = False,
                      skipped: Optional[collections.Counter] = None
                      ) -> dict[str, tuple[Example, ...]]:
  """The held-out examples of a `test/` folder, grouped into evaluation clients.

  Args:
    folder: Flat (`images/` + `masks/`: one client named after the folder) or one
      sub-folder per held-out site (each with `images/` + `masks/`).
    skip_bad_examples: Passed to `list_examples`.
    skipped: Passed to `list_examples`.

  Returns:
    Evaluation client id -> its examples (sorted by stem).

  Raises:
    errors.DataError: Neither layout, or a bad example (see `list_examples`).
  """
  folder = Path(folder)
  listing = dict(skip_bad_examples=skip_bad_examples, skipped=skipped)
  if (folder / "images").is_dir() or (folder / "masks").is_dir():
    return {folder.name: tuple(list_examples(folder, **listing))}
  sites = _site_folders(folder)
  if not sites:
    raise errors.DataError(folder, "no images/ and masks/ folders found (expected "
                           "images/ + masks/, or one sub-folder per site each with both)")
  return {site.name: tuple(list_examples(site, **listing)) for site in sites}


def hold_out_validation(splits: DatasetSplits, *, fraction: float, seed: int) -> DatasetSplits:
  """Holds out `fraction` of every training client's examples for validation.

  At least one example per client when `fraction` > 0, and never all: a client with
  a single example keeps it for training and has none. Chosen by `seed` with its own
  random stream, so the test split and the partition do not change with it.
  """
  if fraction <= 0:
    return splits
  rng = np.random.default_rng([seed, _VALIDATION_STREAM])
  clients, validation = {}, {}
  for client, examples in splits.clients.items():
    train, held = _hold_out(list(examples), fraction, rng)
    clients[client] = tuple(train)
    if held:
      validation[client] = tuple(held)
  return dataclasses.replace(splits, clients=clients, validation=validation)


def limit_labels(splits: DatasetSplits, *, per_client: int, seed: int) -> DatasetSplits:
  """Keeps `per_client` of every training client's examples (0 = all): label scarcity.

  Chosen by `seed` with their own random stream, the first `per_client` of a fixed
  order per client, so a smaller count keeps a subset of a larger one's images and
  every run with the same seed (every `compare` arm) trains on the same ones.
  Validation and test examples are untouched.
  """
  if per_client <= 0:
    return splits
  rng = np.random.default_rng([seed, _LABELS_STREAM])
  clients = {}
  for client, examples in splits.clients.items():
    order = rng.permutation(len(examples))
    clients[client] = tuple(sorted((examples[i] for i in order[:per_client]),
                                   key=lambda e: e.stem))
  return dataclasses.replace(splits, clients=clients)


def select_clients(splits: DatasetSplits, *, train_clients: tuple[str, ...] = (),
                   pool: bool = False) -> DatasetSplits:
  """The training clients a run uses: those named (all when empty), pooled if asked.

  Held-out test examples are never touched, so every selection is evaluated on the
  same test set; validation examples follow their clients (pooled with them).

  Raises:
    errors.ConfigError: A named client is not in the data.
  """
  clients = splits.clients
  unknown = [c for c in train_clients if c not in clients]
  errors.require(not unknown, "train_clients",
                 f"names {', '.join(unknown)}, not a training client of the data (its "
                 f"clients: {', '.join(clients)})")
  validation = splits.validation
  if train_clients:
    clients = {c: clients[c] for c in train_clients}
    validation = {c: v for c, v in validation.items() if c in train_clients}
  if pool:
    clients = {POOLED_CLIENT: tuple(e for exs in clients.values() for e in exs)}
    pooled = tuple(e for exs in validation.values() for e in exs)
    validation = {POOLED_CLIENT: pooled} if pooled else {}
  return dataclasses.replace(splits, clients=clients, validation=validation)
