"""Reading images and masks: pixels as uint8 RGB, masks as instance labels.

Images: PNG, JPEG or TIFF; 8- or 16-bit; gray, RGB or RGBA. 16-bit and float images
are scaled to 8 bits per image with the 1st..99.8th percentile window; alpha is
dropped.

Masks: one channel of integer labels, PNG or TIFF (8-, 16-bit or integer-valued float).
Binary (values {0, v}: the foreground is one object, or one object per 8-connected
component with `binary_components=True`) or instance labels (each non-zero value one
object). Integer masks with several non-zero values, e.g. {0, 1, 2, 255}, are instance
labels (three objects here), never thresholded; float masks must hold integer values.
A mask that is all zeros is valid: the image has no objects (it is cached but not
trained on; see `cache.CacheStats.images_without_objects`).

* JPEG and WebP masks are refused (`lossy_mask`): compression turns {0, 255} into many
  values, which would be read as labels. Found by extension (.jpg, .jpeg) and by
  content (a JPEG or WebP saved as .png, a JPEG- or WebP-compressed TIFF); lossless
  WebP is refused too (it is not told apart).
* An RGB mask is read as gray only if its three channels are equal everywhere; RGBA
  likewise, if its alpha is the same everywhere (e.g. fully opaque). Anything else
  (colour-coded objects, red objects on black, objects drawn as transparency) is
  refused (`colour_mask`), never guessed.
* A palette ('P' mode) PNG mask is read as its palette indices (index = label,
  index 0 = background, whatever the colours). Refused (`colour_mask`) when index 0 is
  not black but another used index is: which one is the background is then unclear.
* 16-bit RGB(A) PNGs are read at 16 bits (Pillow alone would keep the high byte).
* A binary mask read as one object that has `BINARY_HINT_REGIONS` or more separate
  (8-connected) regions logs one hint per process suggesting `--binary_components`.

Every problem raises a `discovery.ExampleError` naming the file, with a reason from
`discovery.SKIP_REASONS` (`skip_bad_examples=True` skips such examples).
"""

import logging
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import tifffile
from PIL import Image

from tff_sam import errors
from tff_sam.data import discovery

# Non-8-bit images: this percentile window of each image maps to 0..255.
PERCENTILES = (1.0, 99.8)

# A binary mask read as one object with at least this many regions logs a hint.
BINARY_HINT_REGIONS = 4

_LOG = logging.getLogger(__name__)

# Hints already logged in this process (each is logged once).
_HINTS_GIVEN: set[str] = set()

# Lossy formats refused for masks: by extension, Pillow format, TIFF compression.
_LOSSY_SUFFIXES = {".jpg": "JPEG", ".jpeg": "JPEG"}
_LOSSY_PIL_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "WEBP": "WebP"}
_LOSSY_TIFF_COMPRESSIONS = {tifffile.COMPRESSION.JPEG: "JPEG",
                            tifffile.COMPRESSION.OJPEG: "JPEG",
                            tifffile.COMPRESSION.WEBP: "WebP"}

_ONE_CHANNEL = ("save one channel of integer labels (0 = background, 1..N = objects), "
                "e.g. a grayscale or 16-bit PNG")


def _distinct_values(a: np.ndarray) -> int:
  """Distinct pixel values of an (H, W) or (H, W, C) array (colours for C > 1)."""
  if a.ndim != 3:
    return int(np.unique(a).size)
  flat = a.reshape(-1, a.shape[-1])
  if a.dtype.kind not in "bu" or a.dtype.itemsize > 2 or a.shape[-1] > 4:
    return int(np.unique(flat, axis=0).shape[0])
  key = np.zeros(flat.shape[0], np.uint64)  # up to 4 channels of 16 bits: one uint64
  for c in range(flat.shape[1]):
    key = key * np.uint64(65536) + flat[:, c].astype(np.uint64)
  return int(np.unique(key).size)


def _lossy_error(path: Path, fmt: str, load: Callable[[], np.ndarray]
                 ) -> discovery.ExampleError:
  """The `lossy_mask` error, with the file's number of values if it decodes."""
  try:
    found = f"; this file has {_distinct_values(np.asarray(load()))} distinct values"
  except Exception:  # pylint: disable=broad-except
    found = ""
  verb = "may be" if fmt == "WebP" else "are"  # WebP can be lossless; not told apart
  return discovery.ExampleError(
      path, f"{fmt} masks {verb} lossy (compression turns a binary {{0, 255}} mask into many "
      f"values, which would be read as instance labels{found}); save masks as PNG or TIFF",
      reason=discovery.LOSSY_MASK)


def _palette_labels(path: Path, im: Image.Image) -> np.ndarray:
  """A palette mask's indices as labels (see the module docstring)."""
  indices = np.asarray(im)
  palette = np.zeros((256, 3), np.uint8)
  entries = np.asarray(im.getpalette("RGB") or [], np.uint8)[:palette.size]
  palette.reshape(-1)[:entries.size] = entries
  used = np.unique(indices)
  black = used[(used != 0) & np.all(palette[used] == 0, axis=1)]
  if black.size and np.any(palette[0] != 0):
    raise discovery.ExampleError(
        path, f"palette mask paints index {int(black[0])} black but index 0 (read as the "
        f"background) is {tuple(int(v) for v in palette[0])}; {_ONE_CHANNEL}",
        reason=discovery.COLOUR_MASK)
  return indices


def _is_16bit_colour_png(im: Image.Image) -> bool:
  """Whether Pillow would drop the low byte of this PNG (16-bit RGB or RGBA)."""
  return (im.format == "PNG" and im.mode in ("RGB", "RGBA")
          and any(";16" in str(tile[3]) for tile in im.tile))


def _read_16bit_colour_png(path: Path) -> np.ndarray:
  a = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
  if a is None or a.ndim != 3 or a.shape[-1] not in (3, 4):
    raise ValueError("OpenCV cannot decode this 16-bit PNG")
  order = [2, 1, 0, 3][:a.shape[-1]]  # OpenCV's BGR(A) -> RGB(A)
  return np.ascontiguousarray(a[..., order])


def _tiff_by_opencv(path: Path) -> "np.ndarray | None":
  """A TIFF whose compression tifffile decodes only with `imagecodecs` (not installed;
  LZW, deflate, ...), decoded by OpenCV's libtiff instead (RGB order); None if OpenCV
  cannot either."""
  array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
  if array is None or array.ndim == 2:
    return array
  return cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA if array.shape[2] == 4 else cv2.COLOR_BGR2RGB)


def _read_array(path: Path, *, mask: bool = False) -> np.ndarray:
  """Decodes one image or mask file into an array.

  Args:
    path: The file.
    mask: Read a mask: lossy formats are refused and palette files give their indices
      (images: palette colours).

  Raises:
    ExampleError: Unreadable (`unreadable`); for masks, lossy (`lossy_mask`) or an
      ambiguous palette (`colour_mask`).
  """
  lossy = _LOSSY_SUFFIXES.get(path.suffix.lower()) if mask else None
  try:
    if path.suffix.lower() in (".tif", ".tiff"):
      with tifffile.TiffFile(str(path)) as tif:
        if mask and lossy is None and tif.pages:
          lossy = _LOSSY_TIFF_COMPRESSIONS.get(tif.pages[0].compression)
        if lossy:
          raise _lossy_error(path, lossy, tif.asarray)
        try:
          return np.asarray(tif.asarray())
        except ValueError as e:  # E.g. LZW or deflate: tifffile needs `imagecodecs`.
          decoded = _tiff_by_opencv(path) if "imagecodecs" in str(e) else None
          if decoded is None:
            raise
          return decoded
    with Image.open(path) as im:
      if mask and lossy is None:
        lossy = _LOSSY_PIL_FORMATS.get(im.format)
      if lossy:
        raise _lossy_error(path, lossy, lambda: np.asarray(im))
      if _is_16bit_colour_png(im):
        return _read_16bit_colour_png(path)
      im.load()
      if im.mode == "P":
        if mask:
          return _palette_labels(path, im)
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
      return np.asarray(im)
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise discovery.ExampleError(path, f"cannot read file ({reason})", reason=discovery.UNREADABLE) from None


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
  raise discovery.ExampleError(
      path, f"unsupported image shape {a.shape} (expected HxW, HxWx3 or HxWx4; "
      "stacks need one file per frame)", reason=discovery.UNSUPPORTED_SHAPE)


def _gray_from_colour(path: Path, a: np.ndarray) -> np.ndarray:
  """The one channel of an RGB(A) mask whose channels are equal (and alpha constant).

  Raises:
    ExampleError: Differing channels or varying alpha (`colour_mask`).
  """
  if a.shape[-1] == 4:
    alpha = a[..., 3]
    if alpha.size and np.any(alpha != alpha.flat[0]):
      raise discovery.ExampleError(
          path, f"RGBA mask with varying alpha (transparency is not read as labels); "
          f"{_ONE_CHANNEL}", reason=discovery.COLOUR_MASK)
  rgb = a[..., :3]
  if np.all(rgb == rgb[..., :1]):
    return rgb[..., 0]
  kind = "RGBA" if a.shape[-1] == 4 else "RGB"
  raise discovery.ExampleError(
      path, f"{kind} mask with differing channels ({_distinct_values(rgb)} colours: "
      f"colour-coded objects?); {_ONE_CHANNEL}", reason=discovery.COLOUR_MASK)


def _hint_binary_components(path: Path, foreground: np.ndarray) -> None:
  """Logs once per process if a binary mask read as one object has many regions."""
  if "binary_components" in _HINTS_GIVEN:
    return
  regions = cv2.connectedComponents(foreground.astype(np.uint8), connectivity=8)[0] - 1
  if regions >= BINARY_HINT_REGIONS:
    _HINTS_GIVEN.add("binary_components")
    _LOG.warning("hint: %s is a binary mask with %d separate regions read as ONE object; "
                 "if they are separate objects, pass --binary_components (shown once)",
                 path, regions)


def read_mask(path: Path, *, binary_components: bool = False) -> np.ndarray:
  """Reads a mask as an int32 instance label image (0 = background).

  Args:
    path: The mask file.
    binary_components: For binary masks, one object per 8-connected component
      instead of one object for the whole foreground.

  Returns:
    (H, W) int32 labels.

  Raises:
    ExampleError: Unreadable (`unreadable`), wrong shape (`unsupported_shape`),
      non-integer, negative or too large values (`bad_mask_values`), a JPEG or WebP
      file (`lossy_mask`), or colours, varying alpha or an ambiguous palette
      (`colour_mask`).
  """
  path = Path(path)
  a = _read_array(path, mask=True)
  if a.ndim == 3 and a.shape[-1] in (3, 4):
    a = _gray_from_colour(path, a)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim != 2:
    raise discovery.ExampleError(path, f"unsupported mask shape {a.shape} (expected HxW)",
                       reason=discovery.UNSUPPORTED_SHAPE)
  if a.dtype.kind == "f":
    if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
      raise discovery.ExampleError(
          path, "mask has non-integer values (expected binary or instance labels)",
          reason=discovery.BAD_MASK_VALUES)
  if a.dtype.kind not in "biuf":
    raise discovery.ExampleError(path, f"unsupported mask dtype {a.dtype}", reason=discovery.BAD_MASK_VALUES)
  if a.size and a.min() < 0:
    raise discovery.ExampleError(path, "mask has negative values", reason=discovery.BAD_MASK_VALUES)
  values = np.unique(a)
  nonzero = values[values != 0]
  if nonzero.size <= 1:
    fg = a != 0
    if not binary_components:
      _hint_binary_components(path, fg)
      return fg.astype(np.int32)
    _, comps = cv2.connectedComponents(fg.astype(np.uint8), connectivity=8)
    return comps.astype(np.int32)
  if nonzero.max() > np.iinfo(np.int32).max:
    raise discovery.ExampleError(path, "mask label values exceed int32", reason=discovery.BAD_MASK_VALUES)
  return a.astype(np.int32)


def load_example(example: discovery.Example, *, binary_components: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Reads an example's image (uint8 RGB) and labels, checking they match in size.

  Raises:
    ExampleError: Unreadable files or bad mask values (see `read_image`, `read_mask`)
      or a size mismatch (`size_mismatch`, naming the mask file).
  """
  image = read_image(example.image_path)
  labels = read_mask(example.mask_path, binary_components=binary_components)
  if image.shape[:2] != labels.shape:
    raise discovery.ExampleError(
        example.mask_path,
        f"mask is {labels.shape[0]}x{labels.shape[1]} but image {example.image_path.name} "
        f"is {image.shape[0]}x{image.shape[1]}", reason=discovery.SIZE_MISMATCH)
  return image, labels


def object_ids(labels: np.ndarray) -> np.ndarray:
  """Sorted non-zero label values of an instance label image."""
  values = np.unique(labels)
  return values[values != 0].astype(np.int32)
