"""SAM's point prompts as the model reads them: the point labels, and the corrective
point of iterative prompting (pure TF, graph-safe).

The decoder's iterative passes (`decoder.PromptMaskDecoder`, `--prompt=iterative`)
sample each next point with `corrective_points`; the data pipeline's first prompts
(`data.prompts`, `data.pipeline`) carry the same labels.

Coordinates are in SAM's input frame (pixels of the resized, padded image), points XY,
as `SamProcessor` produces them.
"""

import tensorflow as tf

POSITIVE, NEGATIVE, NOT_A_POINT = 1, 0, -1
# transformers' padding label: the point gives no token at all (zero embedding).
NO_TOKEN = -10


def corrective_points(logits: tf.Tensor, target: tf.Tensor, *, input_size: int,
                      seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """One corrective point per prompt, sampled where a predicted mask is wrong.

  The training-time rule of micro-sam's iterative prompting: a pixel drawn uniformly
  from the error (missed object or wrongly predicted valid background) becomes a
  positive point if it is missed object, a negative one otherwise; a prompt whose
  mask is right everywhere gets no point (`NO_TOKEN`).

  Args:
    logits: (..., L, L) predicted mask logits (> 0 = object).
    target: (..., L, L) targets: >= 0.5 object, in [0, 0.5) background, < 0 ignored.
    input_size: Side of SAM's input frame; low-res pixel centres are mapped to it.
    seed: Stateless seed, shape [2].

  Returns:
    points (..., 2) float32 XY in the input frame and labels (...) int32.
  """
  lead = tf.shape(logits)[:-2]
  side = tf.shape(logits)[-1]
  pred = logits > 0
  obj, valid = target >= 0.5, target >= 0
  missed = tf.reshape(tf.logical_and(obj, tf.logical_not(pred)), [-1, side * side])
  wrong = tf.reshape(tf.logical_and(tf.logical_and(pred, tf.logical_not(obj)), valid),
                     [-1, side * side])
  error = tf.logical_or(missed, wrong)
  idx = tf.random.stateless_categorical(tf.where(error, 0.0, -1e9), 1, seed,
                                        dtype=tf.int32)[:, 0]
  positive = tf.gather(missed, idx, batch_dims=1)
  labels = tf.where(tf.reduce_any(error, axis=1),
                    tf.where(positive, POSITIVE, NEGATIVE), NO_TOKEN)
  scale = tf.cast(input_size, tf.float32) / tf.cast(side, tf.float32)
  xy = tf.stack([tf.cast(idx % side, tf.float32), tf.cast(idx // side, tf.float32)], axis=-1)
  xy = xy * scale + (scale - 1) / 2
  return (tf.reshape(xy, tf.concat([lead, [2]], axis=0)),
          tf.reshape(tf.cast(labels, tf.int32), lead))
