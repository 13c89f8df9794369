"""SAM's preprocessing for images, masks and prompt coordinates.

Images go through transformers' `SamImageProcessor` unchanged (longest side to the
input size, rescale, normalize, pad). Instance label masks are resized the same way
to the low-resolution frame the decoder predicts (nearest neighbour, PIL, exactly as
`SamImageProcessor` does for `segmentation_maps`, which itself only handles values
<= 255) and padded with -1, which marks pixels excluded from the loss. Prompt
coordinates are mapped from original pixels to the input frame with the processor's
own rule.

Training targets are built from the labels in the *input* frame (e.g. 1024x1024):
each object's coverage of every low-resolution pixel (4x4 average) is its soft target,
which approximates the full-resolution mask far better than a nearest-neighbour
downsample for small objects such as nuclei.
"""

import dataclasses

import cv2
import numpy as np
from PIL import Image
import tensorflow as tf

from tff_sam.data import discovery

PAD_LABEL = -1
# How every image reaches the processor, (H, W, 3), said explicitly: left to guess,
# transformers takes a 3-pixel-high (3, W, 3) image for channels-first.
CHANNELS_LAST = "channels_last"


@dataclasses.dataclass(frozen=True)
class Preprocessed:
  """One image ready for the encoder, and its targets.

  Attributes:
    pixel_values: (3, S, S) float32 for the image encoder (with `resized_only`:
      the (h, w, 3) uint8 resized image).
    input_labels: (S, S) int32 instance labels in SAM's input frame; -1 = padding.
    original_size: (height, width) of the original image.
    reshaped_size: (height, width) of the resized image inside the padded input.
  """

  pixel_values: np.ndarray
  input_labels: np.ndarray
  original_size: tuple[int, int]
  reshaped_size: tuple[int, int]


def resized_shape(original_size: tuple[int, int], longest_edge: int) -> tuple[int, int]:
  """SAM's resize rule: longest side to `longest_edge`, rounding half up."""
  h, w = original_size
  scale = longest_edge / max(h, w)
  return int(h * scale + 0.5), int(w * scale + 0.5)


def require_resizable(path: object, size: tuple[int, int], longest_edge: int) -> None:
  """Refuses an image whose short side SAM's resize would make 0 pixels.

  Args:
    path: The image file (named in the error).
    size: Its (height, width).
    longest_edge: SAM's input size.

  Raises:
    discovery.ExampleError: `TOO_THIN` (skipped under `--skip_bad_examples`).
  """
  if min(resized_shape(size, longest_edge)) < 1:
    h, w = size
    raise discovery.ExampleError(
        path, f"is {w}x{h} pixels: too thin for SAM, which resizes the long side to "
        f"{longest_edge} pixels and the short side to 0; crop or pad it to at most "
        f"{2 * longest_edge}:1", reason=discovery.TOO_THIN)


def resize_labels(labels: np.ndarray, *, longest_edge: int, pad_to: int) -> np.ndarray:
  """Nearest-neighbour resize of an instance label map, padded with -1."""
  h, w = resized_shape(labels.shape, longest_edge)
  small = np.asarray(Image.fromarray(labels.astype(np.int32), mode="I").resize(
      (w, h), Image.NEAREST)).astype(np.int32)
  out = np.full((pad_to, pad_to), PAD_LABEL, np.int32)
  out[:h, :w] = small
  return out


def preprocess(processor, image: np.ndarray, labels: np.ndarray, *,
               input_size: int, resized_only: bool = False) -> Preprocessed:
  """Applies SAM's preprocessing to an image and its instance labels.

  Args:
    processor: A `SamImageProcessor`.
    image: (H, W, 3) uint8.
    labels: (H, W) int instance labels.
    input_size: Side of SAM's (square, padded) input frame.
    resized_only: Stop after the processor's resize: `pixel_values` is then the
      (h, w, 3) uint8 image of `resized_image` (online mode's records), from the
      same single processor call.

  Returns:
    The preprocessed example.
  """
  if resized_only:
    feats = _resized_features(processor, image)
    pixels = _channels_last(feats["pixel_values"][0])
  else:
    feats = processor(images=image, return_tensors="np", input_data_format=CHANNELS_LAST)
    pixels = feats["pixel_values"][0].astype(np.float32)
  return Preprocessed(
      pixel_values=pixels,
      input_labels=resize_labels(labels, longest_edge=input_size, pad_to=input_size),
      original_size=tuple(int(v) for v in feats["original_sizes"][0]),
      reshaped_size=tuple(int(v) for v in feats["reshaped_input_sizes"][0]))


def to_input_frame(coords: np.ndarray, original_size: tuple[int, int],
                   input_size: int) -> np.ndarray:
  """Maps (..., 2) XY pixel coordinates of the original image to SAM's input frame.

  Same rule as `SamProcessor` (`_normalize_coordinates`); boxes are (..., 4) XYXY and
  can be passed reshaped to (..., 2, 2).
  """
  h, w = original_size
  new_h, new_w = resized_shape(original_size, input_size)
  out = np.asarray(coords, np.float64).copy()
  out[..., 0] *= new_w / w
  out[..., 1] *= new_h / h
  return out.astype(np.float32)


def boxes_from_labels(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Tight XYXY boxes (inclusive pixel indices) of each object id: (K, 4) float32."""
  boxes = np.zeros((len(ids), 4), np.float32)
  for k, i in enumerate(ids):
    ys, xs = np.nonzero(labels == i)
    boxes[k] = (xs.min(), ys.min(), xs.max(), ys.max())
  return boxes


def interior_points(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """For each object, its pixel farthest from the boundary (XY): (K, 2) float32.

  The deterministic point prompt used for evaluation.
  """
  points = np.zeros((len(ids), 2), np.float32)
  for k, i in enumerate(ids):
    m = np.pad((labels == i).astype(np.uint8), 1)
    dist = cv2.distanceTransform(m, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    points[k] = (x, y)
  return points


@dataclasses.dataclass(frozen=True)
class PixelNormalization:
  """The processor's rescale + normalize step, to redo it in TF (online mode)."""

  rescale: float
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


def pixel_normalization(processor) -> PixelNormalization:
  """The rescale factor, mean and std a `SamImageProcessor` applies."""
  return PixelNormalization(rescale=float(processor.rescale_factor),
                            mean=tuple(float(v) for v in processor.image_mean),
                            std=tuple(float(v) for v in processor.image_std))


def _resized_features(processor, image: np.ndarray):
  return processor(images=image, do_rescale=False, do_normalize=False, do_pad=False,
                   return_tensors="np", input_data_format=CHANNELS_LAST)


def _channels_last(pixels: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(pixels).transpose(1, 2, 0))


def resized_image(processor, image: np.ndarray) -> np.ndarray:
  """(h, w, 3) uint8: the processor's own resize, before rescale, normalize and pad.

  `pixel_values_tf(resized_image(p, x), ...)` equals `p(images=x).pixel_values` to
  float32 rounding.
  """
  return _channels_last(_resized_features(processor, image)["pixel_values"][0])


def pixel_values_tf(image, normalization: PixelNormalization, input_size: int):
  """Graph-safe: (h, w, 3) uint8 resized image -> (3, S, S) float32 pixel values.

  Rescales and normalizes as the processor does, then zero-pads bottom and right to
  the square input frame.
  """
  x = tf.cast(image, tf.float32) * normalization.rescale
  x = (x - tf.constant(normalization.mean, tf.float32)) / tf.constant(normalization.std,
                                                                       tf.float32)
  shape = tf.shape(x)
  x = tf.pad(x, [[0, input_size - shape[0]], [0, input_size - shape[1]], [0, 0]])
  return tf.ensure_shape(tf.transpose(x, [2, 0, 1]), [3, input_size, input_size])
