"""SAM's prompt encoder + mask decoder as the Keras model TFF trains, and its weights.

`PromptMaskDecoder` applies SAM's prompt encoder (frozen) and mask decoder to image
embeddings. Only the mask decoder's variables are trainable. The IoU head is trained
with an MSE to the IoU of the predicted mask (as lightning-sam does) when
`train_iou_head=True`, so the exported model's `iou_scores` stay meaningful;
otherwise it is frozen. The weight helpers copy the prompt-encoder/decoder part
between any `TFSamModel` and `PromptMaskDecoder` by name.
"""

import numpy as np
import tensorflow as tf
from keras.src import backend as keras_backend
from transformers.models.sam.modeling_tf_sam import TFSamMaskDecoder, TFSamPositionalEmbedding, TFSamPromptEncoder  # pylint: disable=g-multiple-import

from tff_sam import config as config_lib
from tff_sam.models import point_prompts


class GraphSafePromptEncoder(TFSamPromptEncoder):
  """`TFSamPromptEncoder` with its tensor `==`/`!=` comparisons made explicit.

  transformers' TF prompt encoder compares tensors with `==` (e.g. which box corner
  gets which embedding, which point label is padding). In TF2 that is element-wise
  only when executing eagerly outside functions; TFF traces computations in a legacy
  `tf.Graph`, where `tensor == 0` is Python identity, i.e. `False`. Box prompts then
  silently get the wrong corner embeddings and point prompts fail. This subclass
  computes the same thing with `tf.equal`/`tf.not_equal`, which behave the same
  everywhere; its weights (names, shapes, order) are the parent's.
  """

  def _embed_points(self, points, labels, pad):
    points = points + 0.5
    if pad:
      shape = tf.shape(points)
      points = tf.concat([points, tf.zeros([shape[0], shape[1], 1, 2], points.dtype)], axis=2)
      labels = tf.concat([labels, -tf.ones([shape[0], shape[1], 1], labels.dtype)], axis=2)
    embedding = self.shared_embedding(points, (self.input_image_size, self.input_image_size))
    lab = labels[..., None]
    embedding = tf.where(tf.equal(lab, -1), self.not_a_point_embed[0], embedding)
    embedding = tf.where(tf.not_equal(lab, -10), embedding, tf.zeros_like(embedding))
    embedding = tf.where(tf.equal(lab, 0), embedding + self.point_embed[0], embedding)
    embedding = tf.where(tf.equal(lab, 1), embedding + self.point_embed[1], embedding)
    return embedding

  def _embed_boxes(self, boxes):
    boxes = boxes + 0.5
    shape = tf.shape(boxes)
    coords = tf.reshape(boxes, [shape[0], shape[1], 2, 2])
    corners = self.shared_embedding(coords, (self.input_image_size, self.input_image_size))
    first = tf.equal(tf.range(2)[None, None, :, None], 0)
    return corners + tf.where(first, self.point_embed[2][0], self.point_embed[3][0])


def prime_keras_device_list() -> None:
  """Works around Keras 2.14 asking for a TF1 session inside graph tracing (TFF's, or any legacy graph).

  `Conv2DTranspose(data_format="channels_first")` (in SAM's mask decoder) checks for
  GPUs via `keras.backend._get_available_gpus()`, which outside eager mode opens a
  session, and that fails inside a graph function ("Cannot get session inside
  Tensorflow graph function"). Filling Keras's device cache eagerly, once, makes the
  check a lookup. Idempotent.
  """
  if getattr(keras_backend, "_LOCAL_DEVICES", None) is None:
    keras_backend._LOCAL_DEVICES = tf.config.list_logical_devices()  # pylint: disable=protected-access


class PromptMaskDecoder(tf.keras.Model):
  """SAM's prompt encoder + mask decoder on precomputed image embeddings.

  Inputs (a dict):
    image_embeddings: (B, C, s, s) float32.
    boxes: (B, P, 4) float32, XYXY in SAM's input frame (used for `box`/`both`).
    points: (B, P, N, 2) float32, XY in SAM's input frame (used for `points`/`both`).
    point_labels: (B, P, N) int32: 1 positive, 0 negative, -1 padding (-10: no
      token at all, transformers' padding value).
    use_box (`mixed`, `iterative`): (B, P) int32: 1 prompts with the box, 0 with the
      first point.
    mask_inputs (optional): (B, P, L, L) float32 mask logits of a previous prediction,
      SAM's mask prompt (iterative refinement: corrections and `--prompt=iterative`).

  Outputs (a dict): `masks` (B, P, L, L) logits in the low-resolution frame and
  `iou` (B, P) predicted IoU, one mask per prompt (`multimask_output=False`).
  """

  def __init__(self, config, *, prompt: str = config_lib.BOX_PROMPT,
               train_iou_head: bool = True, sub_iterations: int = 3, **kwargs):
    prime_keras_device_list()
    super().__init__(**kwargs)
    if prompt not in config_lib.PROMPT_MODES:
      raise ValueError(f"unknown prompt mode {prompt!r}")
    self.sam_config = config
    self.prompt_mode = prompt
    self.sub_iterations = sub_iterations
    self.shared_image_embedding = TFSamPositionalEmbedding(
        config.vision_config, name="shared_image_embedding")
    self.prompt_encoder = GraphSafePromptEncoder(
        config.prompt_encoder_config, self.shared_image_embedding, name="prompt_encoder")
    self.mask_decoder = TFSamMaskDecoder(config.mask_decoder_config, name="mask_decoder")
    for layer in (self.shared_image_embedding, self.prompt_encoder, self.mask_decoder):
      with tf.name_scope(layer.name):
        layer.build(None)
    self.shared_image_embedding.trainable = False
    self.prompt_encoder.trainable = False
    if not train_iou_head:
      self.mask_decoder.iou_prediction_head.trainable = False
    self.built = True

  def image_positional_embeddings(self) -> tf.Tensor:
    """(1, C, s, s): the positional encoding of every image-embedding cell."""
    size = int(self.sam_config.prompt_encoder_config.image_embedding_size)
    grid = tf.ones((size, size))
    y = (tf.math.cumsum(grid, axis=0) - 0.5) / size
    x = (tf.math.cumsum(grid, axis=1) - 0.5) / size
    pe = self.shared_image_embedding(tf.stack([x, y], axis=-1))
    return tf.expand_dims(tf.transpose(pe, perm=[2, 0, 1]), axis=0)

  def call(self, inputs, training=False):
    embeddings = tf.convert_to_tensor(inputs["image_embeddings"], tf.float32)
    if self.prompt_mode == config_lib.MIXED_PROMPT:
      return self._call_mixed(embeddings, inputs)
    if self.prompt_mode == config_lib.ITERATIVE_PROMPT:
      return self._call_iterative(embeddings, inputs, training=training)
    boxes = points = labels = None
    if config_lib.uses_boxes(self.prompt_mode):
      boxes = tf.cast(inputs["boxes"], tf.float32)
    if config_lib.uses_points(self.prompt_mode):
      points = tf.cast(inputs["points"], tf.float32)
      labels = tf.cast(inputs["point_labels"], tf.int32)
    if "mask_inputs" in inputs:  # One mask prompt per prompt: each its own batch entry.
      masks, iou = self._decode(embeddings, boxes, points, labels, None,
                                tf.cast(inputs["mask_inputs"], tf.float32))
      return {"masks": masks, "iou": iou}
    return self._single_pass(embeddings, boxes, points, labels)

  def _single_pass(self, embeddings, boxes, points, labels):
    """One pass of the prompts of each image together; `boxes` or `points`/`labels`
    may be None (not prompted)."""
    batch = tf.shape(embeddings)[0]
    positional = tf.repeat(self.image_positional_embeddings(), batch, axis=0)
    sparse, dense = self.prompt_encoder(
        batch_size=batch, input_points=points, input_labels=labels, input_boxes=boxes,
        input_masks=None)
    masks, iou, _ = self.mask_decoder(
        image_embeddings=embeddings, image_positional_embeddings=positional,
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        multimask_output=False)
    return {"masks": masks[:, :, 0], "iou": iou[:, :, 0]}

  def _call_mixed(self, embeddings, inputs):
    """`--prompt=mixed`: each prompt's box where `use_box` is 1, else its first point.

    Both passes run and each prompt keeps one (the other gets no gradient), so a
    box-prompted mask is exactly what `box` mode predicts and a point-prompted one
    what `points` mode predicts with that point: the prompts evaluation uses.
    """
    boxed = self._single_pass(embeddings, tf.cast(inputs["boxes"], tf.float32), None, None)
    pointed = self._single_pass(embeddings, None, tf.cast(inputs["points"][:, :, :1], tf.float32),
                                tf.cast(inputs["point_labels"][:, :, :1], tf.int32))
    use_box = tf.cast(inputs["use_box"], tf.int32) > 0
    return {"masks": tf.where(use_box[..., None, None], boxed["masks"], pointed["masks"]),
            "iou": tf.where(use_box, boxed["iou"], pointed["iou"])}

  def _decode(self, embeddings, boxes, points, labels, use_box, mask_inputs):
    """One pass with every prompt as its own batch entry (B*P).

    SAM's TF prompt encoder embeds one mask per image, so per-prompt mask prompts
    (`mask_inputs` (B, P, L, L) logits, optional) need a batch entry per prompt; the
    decoder repeats the image embedding per prompt anyway. With `use_box` (B, P), a
    box is kept only where it is 1 (zero tokens elsewhere: transformers' padding).
    `boxes` or `points`/`labels` may be None (not prompted).
    """
    shape = tf.shape(boxes if boxes is not None else labels)
    batch, num = shape[0], shape[1]

    def flat(t):
      if t is None:
        return None
      return tf.reshape(t, tf.concat([[batch * num, 1], tf.shape(t)[2:]], axis=0))

    repeated = tf.repeat(embeddings, num, axis=0)
    positional = tf.repeat(self.image_positional_embeddings(), batch * num, axis=0)
    sparse, dense = self.prompt_encoder(
        batch_size=batch * num, input_points=flat(points), input_labels=flat(labels),
        input_boxes=flat(boxes), input_masks=flat(mask_inputs))
    if use_box is not None:
      keep = tf.reshape(tf.cast(use_box, sparse.dtype), [-1, 1, 1, 1])
      sparse = tf.concat([sparse[:, :, :-2], sparse[:, :, -2:] * keep], axis=2)  # Box: 2 tokens.
    masks, iou, _ = self.mask_decoder(
        image_embeddings=repeated, image_positional_embeddings=positional,
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        multimask_output=False)
    low = tf.shape(masks)[-1]
    return (tf.reshape(masks[:, 0, 0], [batch, num, low, low]),
            tf.reshape(iou[:, 0, 0], [batch, num]))

  def _call_iterative(self, embeddings, inputs, *, training):
    """micro-sam's iterative prompting (`--prompt=iterative`), in TF.

    Pass 1 prompts with the box where `use_box` is 1, else with the sampled point.
    Each next pass adds one point, sampled uniformly from the pixels where the
    previous mask is wrong (positive on missed object, negative on wrong background;
    no token when it is right everywhere), and feeds the previous logits back as the
    mask prompt. Points and fed-back masks carry no gradient. Training returns every
    pass's masks along the prompt axis (the loss tiles its targets to match: each pass
    is scored); evaluation returns the last pass only.
    """
    boxes = tf.cast(inputs["boxes"], tf.float32)
    points = tf.cast(inputs["points"], tf.float32)
    labels = tf.cast(inputs["point_labels"], tf.int32)
    use_box = tf.cast(inputs["use_box"], tf.int32)
    target = tf.cast(inputs["target"], tf.float32)
    seed = tf.cast(inputs["seed"][0, 0], tf.int32)
    side = int(self.sam_config.prompt_encoder_config.image_size)
    slots = int(inputs["points"].shape[2])
    # Pass 1: the box, or the first point (the point's label becomes no token under a box).
    first = tf.where(use_box[..., None] > 0, point_prompts.NO_TOKEN, labels[..., :1])
    labels = tf.concat([first, labels[..., 1:]], axis=-1)
    masks, iou = self._decode(embeddings, boxes, points, labels, use_box, None)
    all_masks, all_iou = [masks], [iou]
    for step in range(1, min(self.sub_iterations, slots)):
      xy, label = point_prompts.corrective_points(tf.stop_gradient(masks), target,
                                                  input_size=side, seed=tf.stack([seed, step]))
      one_hot = tf.one_hot(step, slots, dtype=tf.float32)[None, None, :]
      points = points * (1 - one_hot[..., None]) + xy[:, :, None] * one_hot[..., None]
      labels = tf.where(tf.equal(tf.range(slots)[None, None, :], step), label[..., None], labels)
      masks, iou = self._decode(embeddings, boxes, tf.stop_gradient(points), labels, use_box,
                                tf.stop_gradient(masks))
      all_masks.append(masks)
      all_iou.append(iou)
    if not training:
      return {"masks": masks, "iou": iou}
    return {"masks": tf.concat(all_masks, axis=1), "iou": tf.concat(all_iou, axis=1)}


_SUBLAYERS = ("shared_image_embedding", "prompt_encoder", "mask_decoder")


def prompt_decoder_weights(model: tf.keras.Model) -> dict[str, tf.Variable]:
  """The prompt encoder, mask decoder and shared positional embedding weights.

  Keyed by name from the sub-layer on, without the `:0` suffix (e.g.
  `mask_decoder/iou_token.weight`), whatever scope the model was built in; works for
  `TFSamModel` and `PromptMaskDecoder` alike. An unbuilt `TFSamModel` is built first
  (in its name scope: plain `build()` drops the model's scope from weight names, and
  `from_pretrained` then silently skips them).
  """
  if not model.built and hasattr(model, "build_in_name_scope"):
    model.build_in_name_scope()
  out = {}
  for layer in _SUBLAYERS:
    for w in getattr(model, layer).weights:
      name = w.name[:-2] if w.name.endswith(":0") else w.name
      starts = [i for i in (name.find(n + "/") for n in _SUBLAYERS) if i >= 0]
      out[name[min(starts):] if starts else name] = w
  return out


def copy_prompt_decoder_weights(src: tf.keras.Model, dst: tf.keras.Model) -> None:
  """Copies prompt encoder, mask decoder and positional embedding weights by name.

  Works between any two of `TFSamModel` and `PromptMaskDecoder` (any prompt mode,
  IoU head trainable or not).
  """
  s, d = prompt_decoder_weights(src), prompt_decoder_weights(dst)
  if set(s) != set(d):
    raise ValueError(f"prompt/decoder weights differ: only in source {sorted(set(s) - set(d))}, "
                     f"only in target {sorted(set(d) - set(s))}")
  for key, var in d.items():
    if var.shape != s[key].shape:
      raise ValueError(f"{key}: shape {s[key].shape} does not match {var.shape}")
    var.assign(s[key])


def model_weights_lists(model: tf.keras.Model) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """(trainable, non_trainable) weights as numpy, in TFF's `ModelWeights` order."""
  return ([w.numpy() for w in model.trainable_weights],
          [w.numpy() for w in model.non_trainable_weights])


def assign_model_weights(model: tf.keras.Model, trainable, non_trainable) -> None:
  """Inverse of `model_weights_lists`."""
  for var, value in zip(model.trainable_weights, trainable, strict=True):
    var.assign(value)
  for var, value in zip(model.non_trainable_weights, non_trainable, strict=True):
    var.assign(value)
