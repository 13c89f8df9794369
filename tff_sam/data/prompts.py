"""Prompt sampling in pure TensorFlow (runs inside tf.data, hence inside TFF).

All functions are stateless: randomness comes from an explicit `seed` (a shape [2]
int tensor), so a client's prompts are a deterministic function of (run seed, round,
client, epoch, example) and are drawn afresh every local epoch and round.

Coordinates are in SAM's input frame (pixels of the resized, padded image); boxes
are XYXY with inclusive pixel indices, points XY, both as `SamProcessor` produces.
Point labels are the model's (`models.point_prompts`), as is the corrective point of
iterative prompting, which the decoder samples itself.
"""

import tensorflow as tf

from tff_sam.models import point_prompts



def jitter_boxes(boxes: tf.Tensor, *, max_jitter: float, input_size: int,
                 seed: tf.Tensor, side_fraction: float = 0.0) -> tf.Tensor:
  """Moves every box coordinate independently by random noise of at most `max_jitter`.

  With `side_fraction` = 0 the noise is U(-max_jitter, max_jitter). With
  `side_fraction` > 0 it is SAM's training noise: Gaussian with a standard deviation
  of `side_fraction` times the box's width (x) or height (y), clipped to
  +-`max_jitter` (the SAM paper uses 10% of the side, at most 20 pixels), so small
  objects get proportionally small noise.

  Args:
    boxes: (..., 4) XYXY boxes.
    max_jitter: Largest shift in input-frame pixels.
    input_size: Side of the input frame; results are clipped to it.
    seed: Stateless seed, shape [2].
    side_fraction: Noise standard deviation as a fraction of the box side (0 for
      uniform noise).

  Returns:
    Jittered boxes with x0 <= x1 and y0 <= y1, inside the frame.
  """
  boxes = tf.convert_to_tensor(boxes, tf.float32)
  if max_jitter > 0:
    if side_fraction > 0:
      x0, y0, x1, y1 = tf.unstack(boxes, axis=-1)
      w, h = tf.abs(x1 - x0) + 1.0, tf.abs(y1 - y0) + 1.0
      std = side_fraction * tf.stack([w, h, w, h], axis=-1)
      noise = tf.random.stateless_normal(tf.shape(boxes), seed) * std
      boxes += tf.clip_by_value(noise, -max_jitter, max_jitter)
    else:
      boxes += tf.random.stateless_uniform(tf.shape(boxes), seed, -max_jitter, max_jitter)
  boxes = tf.clip_by_value(boxes, 0.0, float(input_size - 1))
  x0, y0, x1, y1 = tf.unstack(boxes, axis=-1)
  return tf.stack([tf.minimum(x0, x1), tf.minimum(y0, y1),
                   tf.maximum(x0, x1), tf.maximum(y0, y1)], axis=-1)


def erode(masks: tf.Tensor) -> tf.Tensor:
  """3x3 binary erosion of (P, L, L) {0,1} masks (min-pool)."""
  m = tf.cast(masks, tf.float32)[..., None]
  return -tf.nn.max_pool2d(-m, ksize=3, strides=1, padding="SAME")[..., 0]


def _sample_from(candidates: tf.Tensor, count: int, seed: tf.Tensor
                 ) -> tuple[tf.Tensor, tf.Tensor]:
  """Samples `count` pixel indices per row of (P, L, L) boolean candidates."""
  p = tf.shape(candidates)[0]
  flat = tf.reshape(candidates, [p, -1])
  logits = tf.where(flat, 0.0, -1e9)
  idx = tf.random.stateless_categorical(logits, count, seed, dtype=tf.int32)
  has_any = tf.reduce_any(flat, axis=1, keepdims=True)
  return idx, tf.broadcast_to(has_any, tf.shape(idx))


def sample_points(object_masks: tf.Tensor, valid: tf.Tensor, *, num_positive: int,
                  num_negative: int, input_size: int, seed: tf.Tensor
                  ) -> tuple[tf.Tensor, tf.Tensor]:
  """Samples point prompts from low-resolution object masks.

  Positive points come uniformly from the eroded object (the object itself if
  erosion empties it); negative points from valid pixels outside the object.

  Args:
    object_masks: (P, L, L) {0,1} masks in the low-resolution frame.
    valid: (L, L) bool, False on padding.
    num_positive: Positive points per prompt (>= 1).
    num_negative: Negative points per prompt (>= 0).
    input_size: Side of SAM's input frame; low-res pixel centres are mapped to it.
    seed: Stateless seed, shape [2].

  Returns:
    points (P, num_positive + num_negative, 2) float32 XY in the input frame, and
    labels (P, n) int32: 1 positive, 0 negative, -1 where nothing could be sampled
    (an empty object, or no background left).
  """
  masks = tf.cast(object_masks, tf.float32) > 0.5
  side = tf.shape(masks)[-1]
  eroded = erode(tf.cast(masks, tf.float32)) > 0.5
  has_interior = tf.reduce_any(eroded, axis=[1, 2], keepdims=True)
  positive_region = tf.where(has_interior, eroded, masks)
  seeds = tf.random.experimental.stateless_split(seed, 2)
  idx, ok = _sample_from(positive_region, num_positive, seeds[0])
  labels = tf.where(ok, point_prompts.POSITIVE, point_prompts.NOT_A_POINT)
  if num_negative:
    negative_region = tf.logical_and(valid[None], tf.logical_not(masks))
    nidx, nok = _sample_from(negative_region, num_negative, seeds[1])
    idx = tf.concat([idx, nidx], axis=1)
    negative = tf.where(nok, point_prompts.NEGATIVE, point_prompts.NOT_A_POINT)
    labels = tf.concat([labels, negative], axis=1)
  scale = tf.cast(input_size, tf.float32) / tf.cast(side, tf.float32)
  rows = tf.cast(idx // side, tf.float32)
  cols = tf.cast(idx % side, tf.float32)
  points = tf.stack([cols * scale + (scale - 1) / 2, rows * scale + (scale - 1) / 2], axis=-1)
  points = tf.where(tf.equal(labels[..., None], point_prompts.NOT_A_POINT), 0.0, points)
  return points, tf.cast(labels, tf.int32)
