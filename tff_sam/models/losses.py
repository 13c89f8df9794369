"""Segmentation losses and metrics on low-resolution masks with an ignore label.

Targets are (B, P, L, L) float tensors in [0, 1] (an object's coverage of each
low-resolution pixel: 1 inside, 0 outside, fractional on its boundary) or -1 for
ignored pixels (padding of the input frame, or a whole prompt slot when an image had
fewer objects than `prompts_per_image`). Predictions are the `PromptMaskDecoder` output dict
(`masks` logits (B, P, L, L), `iou` (B, P)).

* `dice_ce` (default): soft Dice with squared predictions in the denominator plus
  binary cross-entropy, both on sigmoid probabilities (MONAI's DiceCELoss with
  `sigmoid=True, squared_pred=True`, as MedSAM uses).
* `bce`: binary cross-entropy only.
* `focal_dice`: 20 * focal + Dice, SAM's own mask loss.
Each is averaged over valid prompts. With `iou_weight > 0`, an MSE between the
predicted IoU and the IoU of the thresholded prediction is added (the IoU head's
target, as lightning-sam trains it).

Metrics keep plain sums as state (TFF aggregates them by summing), so they work
inside TFF, unlike `tf.keras.metrics.BinaryIoU`.
"""

import numpy as np
import tensorflow as tf

EPS = 1e-6


def _prepare(y_true, y_pred):
  logits = tf.cast(y_pred["masks"], tf.float32)
  target = tf.cast(y_true, tf.float32)
  # Iterative prompting returns every pass's masks along the prompt axis: each pass
  # is scored against the same targets.
  target = tf.tile(target, [1, tf.shape(logits)[1] // tf.shape(target)[1], 1, 1])
  valid = tf.cast(target >= 0, tf.float32)
  target = tf.maximum(target, 0.0)
  prompt_valid = tf.cast(tf.reduce_sum(valid, axis=[-2, -1]) > 0, tf.float32)
  return logits, target, valid, prompt_valid


def _masked_mean_per_prompt(values, valid):
  return tf.reduce_sum(values * valid, axis=[-2, -1]) / tf.maximum(
      tf.reduce_sum(valid, axis=[-2, -1]), 1.0)


def soft_dice_loss(prob, target, valid):
  """Per-prompt 1 - Dice with squared predictions in the denominator: (B, P)."""
  inter = tf.reduce_sum(prob * target * valid, axis=[-2, -1])
  denom = tf.reduce_sum((prob ** 2 + target ** 2) * valid, axis=[-2, -1])
  return 1.0 - (2.0 * inter + EPS) / (denom + EPS)


def bce_per_prompt(logits, target, valid):
  """Per-prompt mean binary cross-entropy over valid pixels: (B, P)."""
  ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits)
  return _masked_mean_per_prompt(ce, valid)


def focal_per_prompt(logits, target, valid, gamma: float = 2.0, alpha: float = 0.25):
  """Per-prompt mean sigmoid focal loss over valid pixels: (B, P)."""
  prob = tf.sigmoid(logits)
  ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits)
  p_t = prob * target + (1 - prob) * (1 - target)
  alpha_t = alpha * target + (1 - alpha) * (1 - target)
  return _masked_mean_per_prompt(alpha_t * ce * (1 - p_t) ** gamma, valid)


def hard_iou(logits, target, valid):
  """Per-prompt IoU of (logits > 0) with the target over valid pixels: (B, P)."""
  pred = tf.cast(logits > 0, tf.float32) * valid
  inter = tf.reduce_sum(pred * target, axis=[-2, -1])
  union = tf.reduce_sum(tf.maximum(pred, target * valid), axis=[-2, -1])
  return inter / tf.maximum(union, EPS)


def mask_loss(y_true, y_pred, *, kind: str = "dice_ce", iou_weight: float = 0.0) -> tf.Tensor:
  """The scalar training loss (see the module docstring).

  Args:
    y_true: (B, P, L, L) targets with -1 = ignore.
    y_pred: Dict with `masks` logits and `iou` predictions.
    kind: `dice_ce`, `bce` or `focal_dice`.
    iou_weight: Weight of the IoU-head MSE term (0 disables it).

  Returns:
    Mean loss over valid prompts (0 if the batch has none).
  """
  logits, target, valid, prompt_valid = _prepare(y_true, y_pred)
  prob = tf.sigmoid(logits)
  if kind == "dice_ce":
    per_prompt = soft_dice_loss(prob, target, valid) + bce_per_prompt(logits, target, valid)
  elif kind == "bce":
    per_prompt = bce_per_prompt(logits, target, valid)
  elif kind == "focal_dice":
    per_prompt = 20.0 * focal_per_prompt(logits, target, valid) + soft_dice_loss(prob, target, valid)
  else:
    raise ValueError(f"unknown loss {kind!r}")
  if iou_weight:
    iou_target = tf.stop_gradient(hard_iou(logits, target, valid))
    per_prompt += iou_weight * tf.square(tf.cast(y_pred["iou"], tf.float32) - iou_target)
  return tf.reduce_sum(per_prompt * prompt_valid) / tf.maximum(tf.reduce_sum(prompt_valid), 1.0)


class MaskLoss(tf.keras.losses.Loss):
  """`mask_loss` as a Keras loss (what `tff.learning.models.from_keras_model` takes)."""

  def __init__(self, kind: str = "dice_ce", iou_weight: float = 0.0, name: str = "mask_loss"):
    super().__init__(name=name, reduction=tf.keras.losses.Reduction.NONE)
    self.kind = kind
    self.iou_weight = iou_weight

  def call(self, y_true, y_pred):
    return mask_loss(y_true, y_pred, kind=self.kind, iou_weight=self.iou_weight)

  def get_config(self):
    return {"kind": self.kind, "iou_weight": self.iou_weight, "name": self.name}


class MeanDice(tf.keras.metrics.Metric):
  """Mean per-prompt Dice of thresholded low-resolution predictions (sum/count state)."""

  def __init__(self, name: str = "dice", **kwargs):
    super().__init__(name=name, **kwargs)
    self.total = self.add_weight(name="total", initializer="zeros")
    self.count = self.add_weight(name="count", initializer="zeros")

  def update_state(self, y_true, y_pred, sample_weight=None):
    del sample_weight
    logits, target, valid, prompt_valid = _prepare(y_true, y_pred)
    pred = tf.cast(logits > 0, tf.float32) * valid
    inter = tf.reduce_sum(pred * target, axis=[-2, -1])
    size = tf.reduce_sum(pred, axis=[-2, -1]) + tf.reduce_sum(target * valid, axis=[-2, -1])
    dice = tf.where(size > 0, 2.0 * inter / tf.maximum(size, EPS), 1.0)
    self.total.assign_add(tf.reduce_sum(dice * prompt_valid))
    self.count.assign_add(tf.reduce_sum(prompt_valid))

  def result(self):
    return tf.math.divide_no_nan(self.total, self.count)

  def reset_state(self):
    self.total.assign(0.0)
    self.count.assign(0.0)


def dice_iou(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
  """Dice and IoU of two boolean masks (both 1.0 when both are empty)."""
  pred, target = np.asarray(pred, bool), np.asarray(target, bool)
  inter = float(np.logical_and(pred, target).sum())
  total = float(pred.sum() + target.sum())
  union = float(np.logical_or(pred, target).sum())
  if total == 0:
    return 1.0, 1.0
  return 2.0 * inter / total, inter / union
