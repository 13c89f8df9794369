"""Reading images and masks: pixels as uint8 RGB, masks as instance labels.

Images: PNG, JPEG or TIFF; 8- or 16-bit; gray, RGB or RGBA. 16-bit and float images
are scaled to 8 bits per image with the 1st..99.8th percentile window; alpha is
dropped. Masks: binary (values {0, v}: the foreground is one object, or one object
per 8-connected component with `binary_components=True`) or instance labels (each
non-zero value one object). An RGB mask with equal channels is read as gray; one
with distinct colours is read as one object per colour (black is background).
Integer masks with several non-zero values, e.g. {0, 1, 2, 255}, are instance labels
(three objects here), never thresholded; float masks must hold integer values.
A mask that is all zeros is valid: the image has no objects (it is cached but not
trained on; see `cache.CacheStats.images_without_objects`).

Every problem raises a `discovery.ExampleError` naming the file, with a reason from
`discovery.SKIP_REASONS` (`skip_bad_examples=True` skips such examples).
"""

from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image

from tff_sam import errors
from tff_sam.data import discovery

# Non-8-bit images: this percentile window of each image maps to 0..255.
PERCENTILES = (1.0, 99.8)




def _read_array(path: Path) -> np.ndarray:
  try:
    if path.suffix.lower() in (".tif", ".tiff"):
      return np.asarray(tifffile.imread(str(path)))
    with Image.open(path) as im:
      im.load()
      if im.mode == "P":
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
