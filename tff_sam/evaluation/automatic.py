"""Automatic instance segmentation: every object of an image without prompts.

SAM's automatic mask generation, on this project's models: a regular grid of single
point prompts (`point_grid`), optionally over overlapping crops (`crop_boxes`), each
decoded into a mask with its predicted IoU; masks are kept when the predicted IoU
and the stability score (`stability_score`: how little the mask changes when its
logit threshold moves by `stability_score_offset`) pass their thresholds, and
duplicates are removed by non-maximum suppression on their boxes (`box_nms`), within
each crop and then across crops (smaller crops preferred). Small islands and holes
are removed (`min_mask_region_area`), and masks larger than `max_mask_fraction` of the
image (the background) dropped. `label_image` paints the result into one
uint16 label image of the input's size, largest objects first, so smaller objects on
top of larger ones stay visible.

The encoder runs once per image (per crop); the decoder takes the grid's points in
batches (`points_per_batch`) on that one embedding.

One difference from SAM's generator: each point gives the model's single-mask
output (`multimask_output=False`), not SAM's three ambiguity candidates. That output
is what this project fine-tunes (`models.decoder.PromptMaskDecoder`); the other
three are not trained, so the single mask is the one whose quality fine-tuning
changes, and zero-shot and fine-tuned models are compared on the same footing.
"""

import dataclasses
import math
from typing import Optional

import cv2
import numpy as np
import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam.data import preprocess
from tff_sam.models import build
from tff_sam.models import sam as sam_lib


@dataclasses.dataclass
class Proposals:
  """Masks found in one image (or crop), with what chose them.

  Attributes:
    masks: (K, H, W) bool, in the image's frame.
    boxes: (K, 4) XYXY inclusive pixel boxes of the masks.
    iou: (K,) predicted IoU.
    stability: (K,) stability scores.
    points: (K, 2) the XY grid point that prompted each mask.
    crop: (K, 4) XYXY crop box each mask came from.
  """

  masks: np.ndarray
  boxes: np.ndarray
  iou: np.ndarray
  stability: np.ndarray
  points: np.ndarray
  crop: np.ndarray

  def take(self, keep: np.ndarray) -> "Proposals":
    return Proposals(*(getattr(self, f.name)[keep] for f in dataclasses.fields(self)))

  @staticmethod
  def concat(parts: list["Proposals"], shape: tuple[int, int]) -> "Proposals":
    if not parts:
      return Proposals(np.zeros((0, *shape), bool), np.zeros((0, 4), np.float32),
                       *(np.zeros((0,), np.float32) for _ in range(2)),
                       np.zeros((0, 2), np.float32), np.zeros((0, 4), np.int64))
    return Proposals(*(np.concatenate([getattr(p, f.name) for p in parts])
                       for f in dataclasses.fields(Proposals)))


@dataclasses.dataclass
class Tally:
  """What the filters did to a generator's grid masks, over the images it segmented
  since the tally was made: enough to say why nothing was found (`hint`).

  Attributes:
    passed_stability: Masks that passed both thresholds.
    ious: Every grid mask's predicted IoU, one array per decoder batch.
    stabilities: The stability scores of the masks that passed `pred_iou_thresh`.
  """

  passed_stability: int = 0
  ious: list = dataclasses.field(default_factory=list)
  stabilities: list = dataclasses.field(default_factory=list)

  @property
  def prompts(self) -> int:
    """Grid points decoded."""
    return sum(len(a) for a in self.ious)

  @property
  def passed_iou(self) -> int:
    """Masks whose predicted IoU passed `pred_iou_thresh`."""
    return sum(len(a) for a in self.stabilities)

  def hint(self, settings: config_lib.AutomaticSettings) -> str:
    """Which filter removed every mask and what to try instead ('' if masks passed)."""
    if not self.prompts or self.passed_stability:
      return ""
    if self.passed_iou:
      stability = np.concatenate(self.stabilities)
      return (f"{self.passed_iou} of {self.prompts} grid masks passed --pred_iou_thresh but "
              f"none --stability_score_thresh={settings.stability_score_thresh:g}: their "
              f"stability scores reach {stability.max():.2f} (median "
              f"{np.median(stability):.2f}). Try --stability_score_thresh="
              f"{_round_down(np.quantile(stability, 0.75)):g}")
    iou = np.concatenate(self.ious)
    suggestion = _round_down(np.quantile(iou, 0.75))
    why = ("SAM's thresholds suit SAM's own IoU head; a fine-tuned head predicts the "
           "IoUs it reached on its training data. " if settings.pred_iou_thresh
           == config_lib.AutomaticSettings.pred_iou_thresh else "")
    return (f"no mask passed --pred_iou_thresh={settings.pred_iou_thresh:g}: the model "
            f"predicts IoUs up to {iou.max():.2f} (median {np.median(iou):.2f}) for its "
            f"{self.prompts} grid masks. {why}Try --pred_iou_thresh={suggestion:g} "
            "--stability_score_thresh=0.8")


def _round_down(value: float) -> float:
  """`value` rounded down to a multiple of 0.05 (a threshold to suggest)."""
  return math.floor(20 * float(value) + 1e-9) / 20


def point_grid(points_per_side: int) -> np.ndarray:
  """(n², 2) XY points in [0, 1]², centred in n x n equal cells."""
  offset = 1.0 / (2 * points_per_side)
  side = np.linspace(offset, 1 - offset, points_per_side)
  xs, ys = np.meshgrid(side, side)
  return np.stack([xs.ravel(), ys.ravel()], axis=-1).astype(np.float32)


def crop_boxes(size: tuple[int, int], *, n_layers: int,
               overlap_ratio: float) -> list[tuple[tuple[int, int, int, int], int]]:
  """The crops of each layer: ((x0, y0, x1, y1), layer); layer 0 is the whole image."""
  h, w = size
  out = [((0, 0, w, h), 0)]
  short = min(h, w)
  for layer in range(1, n_layers + 1):
    per_side = 2 ** layer
    overlap = int(overlap_ratio * short * (2 / per_side))
    crop_w = int(np.ceil((overlap * (per_side - 1) + w) / per_side))
    crop_h = int(np.ceil((overlap * (per_side - 1) + h) / per_side))
    for y0 in (int((crop_h - overlap) * i) for i in range(per_side)):
      for x0 in (int((crop_w - overlap) * i) for i in range(per_side)):
        out.append(((x0, y0, min(x0 + crop_w, w), min(y0 + crop_h, h)), layer))
  return out


def stability_score(logits: np.ndarray, *, threshold: float, offset: float) -> np.ndarray:
  """|logits > threshold + offset| / |logits > threshold - offset| per mask (K, H, W)."""
  high = (logits > threshold + offset).sum(axis=(-1, -2), dtype=np.int64)
  low = (logits > threshold - offset).sum(axis=(-1, -2), dtype=np.int64)
  return np.where(low > 0, high / np.maximum(low, 1), 0.0).astype(np.float32)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
  """(K, 4) XYXY inclusive pixel boxes of (K, H, W) masks; zeros for an empty mask."""
  boxes = np.zeros((len(masks), 4), np.float32)
  for k, mask in enumerate(masks):
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows):
      boxes[k] = (cols[0], rows[0], cols[-1], rows[-1])
  return boxes


def box_nms(boxes: np.ndarray, scores: np.ndarray, *, threshold: float) -> np.ndarray:
  """Indices kept by greedy non-maximum suppression (highest score first)."""
  if not len(boxes):
    return np.zeros((0,), np.int64)
  yxyx = np.asarray(boxes, np.float32)[:, [1, 0, 3, 2]]
  keep = tf.image.non_max_suppression(yxyx, np.asarray(scores, np.float32),
                                      max_output_size=len(boxes), iou_threshold=threshold)
  return keep.numpy().astype(np.int64)


def near_crop_edge(boxes: np.ndarray, crop: tuple[int, int, int, int],
                   size: tuple[int, int], *, atol: float = 20.0) -> np.ndarray:
  """(K,) whether a box touches an edge of its crop that is not an edge of the image."""
  x0, y0, x1, y1 = crop
  h, w = size
  crop_edges = np.array([x0, y0, x1 - 1, y1 - 1], np.float32)
  image_edges = np.array([0, 0, w - 1, h - 1], np.float32)
  at_crop = np.isclose(boxes, crop_edges, atol=atol, rtol=0)
  at_image = np.isclose(boxes, image_edges, atol=atol, rtol=0)
  return np.any(at_crop & ~at_image, axis=1)


def remove_small_regions(mask: np.ndarray, area: int) -> np.ndarray:
  """`mask` without islands and holes smaller than `area` pixels."""
  out = mask.copy()
  for value in (False, True):  # Holes (background islands) first, then islands.
    region = (out == value).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(region, connectivity=8)
    small = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] < area]
    if value and len(small) == count - 1 and count > 1:  # Keep the largest island.
      small.remove(1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])))
    out[np.isin(labels, small)] = not value
  return out


def label_image(proposals: Proposals, shape: tuple[int, int]) -> np.ndarray:
  """One uint16 label image: objects 1..K painted largest first (smaller ones on top).

  An object entirely covered by smaller ones does not appear; labels are renumbered
  1..N over the objects that do.
  """
  labels = np.zeros(shape, np.int32)
  order = np.argsort(-proposals.masks.sum(axis=(1, 2), dtype=np.int64), kind="stable")
  for k, i in enumerate(order, start=1):
    labels[proposals.masks[i]] = k
  present = np.unique(labels[labels > 0])
  lookup = np.zeros(len(order) + 1, np.uint16)
  lookup[present] = np.arange(1, len(present) + 1)
  return lookup[labels]


class AutomaticMaskGenerator:
  """Every object of an image, from a grid of point prompts (module docstring)."""

  def __init__(self, bundle: sam_lib.SamBundle, *,
               settings: Optional[config_lib.AutomaticSettings] = None,
               decoder: Optional[tf.keras.Model] = None):
    """Args:
      bundle: A pretrained or fine-tuned SAM (its encoder, processor and config).
      settings: Default: SAM's.
      decoder: A point-prompt `PromptMaskDecoder` to decode with (e.g. one whose
        weights are being evaluated); default: `bundle`'s own.
    """
    self.bundle = bundle
    self.settings = settings or config_lib.AutomaticSettings()
    self._model = decoder or build.build_prompt_mask_decoder(bundle, prompt="points")
    self._forward = tf.function(lambda x: self._model(x, training=False),
                                reduce_retracing=True)
    self.input_size = sam_lib.image_size(bundle.config)
    self.tally = Tally()

  def __call__(self, image: np.ndarray) -> Proposals:
    """The kept masks of `image` ((H, W, 3) uint8), in its frame."""
    s, size = self.settings, image.shape[:2]
    parts = []
    for crop, layer in crop_boxes(size, n_layers=s.crop_n_layers,
                                  overlap_ratio=s.crop_overlap_ratio):
      parts.append(self._crop_proposals(image, crop, layer))
    found = Proposals.concat(parts, size)
    if s.crop_n_layers:  # Across crops: prefer the mask of the smaller crop.
      crop_area = (found.crop[:, 2] - found.crop[:, 0]) * (found.crop[:, 3] - found.crop[:, 1])
      found = found.take(box_nms(found.boxes, 1.0 / np.maximum(crop_area, 1),
                                 threshold=s.crop_nms_thresh))
    return self._finished(found, size)

  def from_embedding(self, embedding: np.ndarray, *, original_size: tuple[int, int],
                     reshaped_size: tuple[int, int]) -> Proposals:
    """The kept masks of an image whose embedding ((C, s, s)) is known, e.g. cached:
    the whole image only (no crops)."""
    found = self._candidates(tf.constant(np.asarray(embedding, np.float32)[None]),
                             size=original_size, reshaped=reshaped_size, layer=0)
    found.crop[:] = (0, 0, original_size[1], original_size[0])
    found = found.take(box_nms(found.boxes, found.iou, threshold=self.settings.box_nms_thresh))
    return self._finished(found, original_size)

  def _finished(self, found: Proposals, size: tuple[int, int]) -> Proposals:
    """Cleaned (`min_mask_region_area`) and without background-sized masks."""
    if self.settings.min_mask_region_area:
      found = self._cleaned(found)
    area = found.masks.sum(axis=(1, 2), dtype=np.int64)
    return found.take(area <= self.settings.max_mask_fraction * size[0] * size[1])

  def _crop_proposals(self, image: np.ndarray, crop: tuple[int, int, int, int],
                      layer: int) -> Proposals:
    """The kept masks of one crop (encoded here), in the image's frame: in a crop of
    a layer > 0, none touching an edge of the crop inside the image; then NMS."""
    x0, y0, x1, y1 = crop
    piece = np.ascontiguousarray(image[y0:y1, x0:x1])
    feats = self.bundle.processor(images=piece, return_tensors="np",
                                  input_data_format=preprocess.CHANNELS_LAST)
    embedding = self.bundle.encoder_fn()(tf.constant(feats["pixel_values"].astype(np.float32)))
    found = _uncropped(self._candidates(
        embedding, size=piece.shape[:2], layer=layer,
        reshaped=tuple(int(v) for v in feats["reshaped_input_sizes"][0])), crop, image.shape[:2])
    if layer:
      found = found.take(~near_crop_edge(found.boxes, crop, image.shape[:2]))
    return found.take(box_nms(found.boxes, found.iou, threshold=self.settings.box_nms_thresh))

  def _candidates(self, embedding: tf.Tensor, *, size: tuple[int, int],
                  reshaped: tuple[int, int], layer: int) -> Proposals:
    """The masks of the grid (of `layer`) on one embedding of an image (crop) of
    `size` that pass the predicted-IoU and stability thresholds."""
    s = self.settings
    per_side = s.points_per_side // (s.crop_n_points_downscale_factor ** layer)
    grid = point_grid(max(1, per_side)) * np.array([size[1], size[0]], np.float32)
    return Proposals.concat([
        self._batch(embedding, grid[start:start + s.points_per_batch], size, reshaped)
        for start in range(0, len(grid), s.points_per_batch)], size)

  def _batch(self, embedding: tf.Tensor, points: np.ndarray, size: tuple[int, int],
             reshaped: tuple[int, int]) -> Proposals:
    """Decodes one batch of points (crop pixels) and keeps the masks that pass."""
    s, n = self.settings, len(points)
    batch = np.zeros((s.points_per_batch, 1, 2), np.float32)  # Fixed: traced once.
    batch[:n, 0] = preprocess.to_input_frame(points, size, self.input_size)
    labels = np.full((s.points_per_batch, 1), -1, np.int32)
    labels[:n] = 1
    out = self._forward({"image_embeddings": embedding,
                         "boxes": tf.zeros((1, s.points_per_batch, 4)),
                         "points": batch[None], "point_labels": labels[None]})
    iou = out["iou"].numpy()[0, :n]
    keep = iou >= s.pred_iou_thresh
    self.tally.ious.append(iou)
    logits = np.zeros((0, *size), np.float32)
    if keep.any():
      low = tf.constant(out["masks"].numpy()[0, :n][keep][:, None])
      logits = self.bundle.processor.post_process_masks(
          [low], [size], [reshaped], binarize=False, return_tensors="tf")[0][:, 0].numpy()
    stability = stability_score(logits, threshold=0.0, offset=s.stability_score_offset)
    stable = stability >= s.stability_score_thresh
    self.tally.passed_stability += int(stable.sum())
    self.tally.stabilities.append(stability)
    masks = logits[stable] > 0.0
    return Proposals(masks, mask_boxes(masks), iou[keep][stable], stability[stable],
                     points[keep][stable], np.zeros((int(stable.sum()), 4), np.int64))

  def _cleaned(self, found: Proposals) -> Proposals:
    """Small islands and holes removed; changed masks rank below unchanged ones in a
    last non-maximum suppression (SAM's rule)."""
    masks = np.stack([remove_small_regions(m, self.settings.min_mask_region_area)
                      for m in found.masks]) if len(found.masks) else found.masks
    unchanged = np.array([np.array_equal(a, b) for a, b in zip(masks, found.masks)], bool)
    found = dataclasses.replace(found, masks=masks, boxes=mask_boxes(masks))
    keep = box_nms(found.boxes, unchanged.astype(np.float32),
                   threshold=self.settings.box_nms_thresh)
    nonempty = found.masks[keep].any(axis=(1, 2))
    return found.take(keep[nonempty])


def _uncropped(found: Proposals, crop: tuple[int, int, int, int],
               size: tuple[int, int]) -> Proposals:
  """`found` of one crop moved into the frame of the whole image (`size`)."""
  x0, y0, x1, y1 = crop
  if (x0, y0, x1, y1) == (0, 0, size[1], size[0]):
    found.crop[:] = crop
    return found
  masks = np.zeros((len(found.masks), *size), bool)
  masks[:, y0:y1, x0:x1] = found.masks
  shift = np.array([x0, y0, x0, y0], np.float32)
  return Proposals(masks, found.boxes + shift, found.iou, found.stability,
                   found.points + shift[:2], np.tile(np.array(crop, np.int64), (len(masks), 1)))
