"""SAM as self-contained TF graphs: what the SavedModel and ONNX exports hold.

* `encoder_function`: pixel values (1, 3, S, S) -> image embeddings (1, C, s, s),
  with the bundle's image encoder (TFSamModel's ViT or MobileSAM's TinyViT).
* `SamOnnxDecoder`: prompt encoder + mask decoder + mask post-processing with the
  signature of segment-anything's ONNX export (`scripts/export_onnx_model.py`,
  single-mask output): inputs `image_embeddings` (1, C, s, s), `point_coords`
  (1, N, 2) in the input frame, `point_labels` (1, N) (1 positive, 0 negative, 2 and
  3 a box's top-left and bottom-right corners, -1 padding), `mask_input`
  (1, 1, L, L), `has_mask_input` (1,), `orig_im_size` (2,) as (height, width);
  outputs `masks` (1, 1, H, W) logits at the original size, `iou_predictions`
  (1, 1) and `low_res_masks` (1, 1, L, L). As there, a prompt of more than two
  points (e.g. a box) takes the single-mask output and one or two points the best
  of the three multimask outputs by predicted IoU.
* `SamServing`: the SavedModel's serving signature, `image` (H, W, 3) uint8 and
  `boxes` (K, 4) XYXY in image pixels -> `masks` (K, H, W) bool at the original size,
  `iou_scores` (K,) and `low_res_logits` (K, L, L): SAM's preprocessing (resize the
  longest side to S, rescale, normalize, pad) and post-processing in TF.
"""

import tensorflow as tf

from tff_sam.data import preprocess
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import sam as sam_lib

# segment-anything's ONNX decoder outputs, in its order.
ONNX_DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")


def encoder_function(bundle: sam_lib.SamBundle) -> tf.types.experimental.GenericFunction:
  """A `tf.function` pixel values (1, 3, S, S) -> image embeddings (1, C, s, s)."""
  side = sam_lib.image_size(bundle.config)
  encode = bundle.encoder_fn()

  @tf.function(input_signature=[tf.TensorSpec([1, 3, side, side], tf.float32,
                                              name="pixel_values")])
  def encoder(pixel_values):
    return {"image_embeddings": encode(pixel_values)}

  return encoder


def _resize(x: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """Bilinear resize of (B, C, h, w) to `size` (PyTorch's `interpolate`, no antialias)."""
  x = tf.transpose(x, [0, 2, 3, 1])
  x = tf.image.resize(x, size, method="bilinear", antialias=False)
  return tf.transpose(x, [0, 3, 1, 2])


def _prepadded_size(original: tf.Tensor, longest: int) -> tf.Tensor:
  """SAM's resize rule in TF: floor(scale x size + 0.5), as int32 (height, width)."""
  original = tf.cast(original, tf.float32)
  scale = longest / tf.reduce_max(original)
  return tf.cast(tf.floor(scale * original + 0.5), tf.int32)


class SamOnnxDecoder(tf.Module):
  """segment-anything's ONNX decoder (module docstring) over a `PromptMaskDecoder`."""

  def __init__(self, decoder: decoder_lib.PromptMaskDecoder):
    super().__init__(name="sam_onnx_decoder")
    self._decoder = decoder
    config = decoder.sam_config
    self._input_size = sam_lib.image_size(config)
    self._low_res = sam_lib.low_res_size(config)
    self._channels, side, _ = sam_lib.embedding_shape(config)
    self._side = side

  def signature(self) -> list[tf.TensorSpec]:
    """The input signature (names as segment-anything's ONNX model)."""
    return [
        tf.TensorSpec([1, self._channels, self._side, self._side], tf.float32,
                      name="image_embeddings"),
        tf.TensorSpec([1, None, 2], tf.float32, name="point_coords"),
        tf.TensorSpec([1, None], tf.float32, name="point_labels"),
        tf.TensorSpec([1, 1, self._low_res, self._low_res], tf.float32, name="mask_input"),
        tf.TensorSpec([1], tf.float32, name="has_mask_input"),
        tf.TensorSpec([2], tf.float32, name="orig_im_size"),
    ]

  def _sparse(self, point_coords: tf.Tensor, point_labels: tf.Tensor) -> tf.Tensor:
    prompt = self._decoder.prompt_encoder
    size = float(self._input_size)
    pe = self._decoder.shared_image_embedding((point_coords + 0.5)[:, None], (size, size))
    labels = point_labels[:, None, :, None]
    embedding = pe * tf.cast(tf.not_equal(labels, -1.0), tf.float32)
    embedding += prompt.not_a_point_embed[0] * tf.cast(tf.equal(labels, -1.0), tf.float32)
    for i, point_embed in enumerate(prompt.point_embed):
      embedding += point_embed[0] * tf.cast(tf.equal(labels, float(i)), tf.float32)
    return embedding  # (1, 1, N, C)

  def _dense(self, mask_input: tf.Tensor, has_mask_input: tf.Tensor) -> tf.Tensor:
    prompt = self._decoder.prompt_encoder
    has = tf.reshape(has_mask_input, [1, 1, 1, 1])
    no_mask = tf.reshape(prompt.no_mask_embed[0], [1, -1, 1, 1])
    return has * prompt.mask_embed(mask_input) + (1.0 - has) * no_mask

  def __call__(self, image_embeddings, point_coords, point_labels, mask_input,
               has_mask_input, orig_im_size):
    sparse = self._sparse(point_coords, point_labels)
    dense = self._dense(mask_input, has_mask_input)
    positional = self._decoder.image_positional_embeddings()
    args = dict(image_embeddings=image_embeddings, image_positional_embeddings=positional,
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
    single, single_iou, _ = self._decoder.mask_decoder(multimask_output=False, **args)
    multi, multi_iou, _ = self._decoder.mask_decoder(multimask_output=True, **args)
    masks = tf.concat([single, multi], axis=2)[0]  # (1, 4, L, L)
    iou = tf.concat([single_iou, multi_iou], axis=2)[0]  # (1, 4)
    # segment-anything's `select_masks`: more than two points -> the single mask.
    num_points = tf.cast(tf.shape(point_coords)[1], tf.float32)
    reweight = tf.one_hot(0, tf.shape(iou)[1]) * 1000.0
    best = tf.argmax(iou + (num_points - 2.5) * reweight, axis=1, output_type=tf.int32)[0]
    low_res = masks[:, best][:, None]
    upscaled = _resize(low_res, [self._input_size, self._input_size])
    h, w = tf.unstack(_prepadded_size(orig_im_size, self._input_size))
    upscaled = upscaled[:, :, :h, :w]
    original = tf.cast(orig_im_size, tf.int32)
    masks_out = _resize(upscaled, original)
    return {"masks": masks_out, "iou_predictions": iou[:, best][:, None],
            "low_res_masks": low_res}


class SamServing(tf.Module):
  """Image + boxes -> masks at the original size (module docstring).

  Attributes:
    segment: The serving `tf.function`.
    variables_to_save: The encoder's and decoder's variables. The Keras models
      themselves stay out of the module (in the function's closure): the SavedModel
      then holds this one function and the variables, without Keras re-tracing
      every layer (which fails on transformers' SAM layers).
  """

  def __init__(self, bundle: sam_lib.SamBundle, decoder: decoder_lib.PromptMaskDecoder):
    super().__init__(name="sam_serving")
    encode = bundle.encoder_fn()
    input_size = sam_lib.image_size(bundle.config)
    normalization = preprocess.pixel_normalization(bundle.processor)
    encoder = bundle.image_encoder or bundle.sam.vision_encoder
    self.variables_to_save = list(encoder.weights) + list(decoder.weights)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="image"),
                                  tf.TensorSpec([None, 4], tf.float32, name="boxes")])
    def segment(image, boxes):
      original = tf.shape(image)[:2]
      resized = _prepadded_size(original, input_size)
      small = tf.image.resize(image, resized, method="bilinear", antialias=True)
      small = tf.cast(tf.clip_by_value(tf.round(small), 0.0, 255.0), tf.uint8)
      pixels = preprocess.pixel_values_tf(small, normalization, input_size)
      embeddings = encode(pixels[None])
      scale = tf.cast(resized, tf.float32) / tf.cast(original, tf.float32)  # (y, x)
      in_frame = boxes * tf.stack([scale[1], scale[0], scale[1], scale[0]])
      out = decoder({"image_embeddings": embeddings, "boxes": in_frame[None]}, training=False)
      low_res = out["masks"]  # (1, K, L, L)
      upscaled = _resize(low_res, [input_size, input_size])
      upscaled = upscaled[:, :, :resized[0], :resized[1]]
      logits = _resize(upscaled, original)[0]
      return {"masks": logits > 0.0, "iou_scores": out["iou"][0], "low_res_logits": low_res[0]}

    self.segment = segment
