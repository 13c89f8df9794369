"""Instance segmentation accuracy: mSA, SA50 and SA75, as micro-sam reports them.

micro-sam (Archit et al., Nature Methods 2025) evaluates prompted segmentation by
stitching each object's predicted mask into one label image per image and comparing
it with the ground-truth label image by *segmentation accuracy*: at an IoU threshold
t, objects are matched one to one (a pair counts when its IoU is at least t), and

    SA(t) = TP / (TP + FP + FN)

with TP the matched pairs, FP the predicted objects left unmatched and FN the true
objects left unmatched. mSA is the mean of SA over t = 0.50, 0.55, ..., 0.95; SA50 and
SA75 are SA at 0.5 and 0.75. The matching is the optimal assignment that maximizes the
number of pairs at or above t, ties broken by IoU (the rule of `elf.evaluation`, which
micro-sam uses, and of StarDist's matching). Label 0 is background; every other value
is one object.

Two of elf's rules are kept so that the numbers compare with micro-sam's: SA is 0
whenever no pair matches (also for an image with no object on either side), and the
thresholds are `np.arange(0.5, 1.0, 0.05)`, whose float values lie a hair above the
round ones from 0.55 on (0.7500000000000002), so an IoU of exactly 0.75 does not match
at "0.75".
"""

from typing import Optional, Sequence

import numpy as np
from scipy import optimize

# The IoU thresholds of mSA, 0.50, 0.55, ..., 0.95, as elf computes them (module docstring).
IOU_THRESHOLDS = tuple(float(t) for t in np.arange(0.5, 1.0, 0.05))


def stitch_masks(masks: Sequence[np.ndarray], *, shape: Optional[tuple[int, int]] = None
                 ) -> np.ndarray:
  """One label image from per-object binary masks: mask k (0-based) becomes label k + 1.

  Where masks overlap, the later one wins (micro-sam writes its prompted masks into
  the label image in the order of the objects, each overwriting what it covers).

  Args:
    masks: Binary masks of one image, all of the same shape.
    shape: The image's shape, needed when there are no masks.

  Returns:
    An int32 label image.

  Raises:
    ValueError: No masks and no shape, or masks of different shapes.
  """
  if not masks and shape is None:
    raise ValueError("stitch_masks needs a shape when there are no masks")
  shape = tuple(np.shape(masks[0])) if masks else tuple(shape)
  labels = np.zeros(shape, np.int32)
  for k, mask in enumerate(masks):
    mask = np.asarray(mask, bool)
    if mask.shape != shape:
      raise ValueError(f"mask {k} has shape {mask.shape}, expected {shape}")
    labels[mask] = k + 1
  return labels


def iou_matrix(true_labels: np.ndarray, pred_labels: np.ndarray) -> np.ndarray:
  """IoU of every (true object, predicted object) pair, background (0) left out.

  Returns:
    An array of shape (true objects, predicted objects), objects in increasing
    label order.

  Raises:
    ValueError: The label images differ in shape.
  """
  true_labels, pred_labels = np.asarray(true_labels), np.asarray(pred_labels)
  if true_labels.shape != pred_labels.shape:
    raise ValueError(f"label images differ in shape: {true_labels.shape} vs "
                     f"{pred_labels.shape}")
  true_ids, true_index = np.unique(true_labels, return_inverse=True)
  pred_ids, pred_index = np.unique(pred_labels, return_inverse=True)
  overlap = np.zeros((len(true_ids), len(pred_ids)), np.int64)
  np.add.at(overlap, (true_index.ravel(), pred_index.ravel()), 1)
  keep_true, keep_pred = true_ids != 0, pred_ids != 0
  sizes_true = overlap.sum(axis=1)[keep_true]
  sizes_pred = overlap.sum(axis=0)[keep_pred]
  intersection = overlap[np.ix_(keep_true, keep_pred)]
  union = sizes_true[:, None] + sizes_pred[None, :] - intersection
  return intersection / np.maximum(union, 1)


def true_positives(iou: np.ndarray, threshold: float) -> int:
  """Pairs of an optimal one-to-one matching with IoU >= `threshold`.

  The assignment maximizes the number of such pairs; among those, the total IoU.
  """
  if iou.size == 0 or not np.any(iou >= threshold):
    return 0
  n = min(iou.shape)
  costs = -(iou >= threshold).astype(np.float64) - iou / (2 * n)
  rows, cols = optimize.linear_sum_assignment(costs)
  return int(np.count_nonzero(iou[rows, cols] >= threshold))


def segmentation_accuracy(true_labels: np.ndarray, pred_labels: np.ndarray, *,
                          thresholds: Sequence[float] = IOU_THRESHOLDS) -> dict:
  """mSA, SA50, SA75 and SA at each threshold of one image.

  SA is 0 when no pair matches, also when neither side has an object (elf's rule).

  Returns:
    `msa`; `sa50` and `sa75` (SA at the thresholds nearest 0.5 and 0.75);
    `per_threshold` ({threshold rounded to 2 decimals: SA}); the object counts.
  """
  iou = iou_matrix(true_labels, pred_labels)
  n_true, n_pred = iou.shape
  per_threshold = {}
  for t in thresholds:
    tp = true_positives(iou, t)
    per_threshold[round(float(t), 2)] = tp / (n_true + n_pred - tp) if tp else 0.0
  out = {"msa": float(np.mean(list(per_threshold.values()))),
         "per_threshold": per_threshold, "num_true": n_true, "num_predicted": n_pred}
  for name, t in (("sa50", 0.5), ("sa75", 0.75)):
    if t in per_threshold:
      out[name] = per_threshold[t]
  return out
