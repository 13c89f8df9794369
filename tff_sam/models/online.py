"""The model of online mode: a frozen image encoder in front of `PromptMaskDecoder`."""

import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import encoders
from tff_sam.models import sam as sam_lib


def freeze(layer: tf.keras.layers.Layer) -> None:
  """Makes `layer` and every layer inside it non-trainable, however Keras built them.

  `layer.trainable = False` alone does not reach every sublayer where TFF builds the
  model: in its legacy graph Keras makes v1 layers, whose `trainable` setter recurses
  only into sublayers held in attributes, not into lists (TinyViT's stages and blocks).
  Those stayed trainable there, and Keras lists a frozen layer's weights trainable-first
  per trainable sublayer, so the TFF model's non-trainable weights came in another
  order than the eager model's (BatchNorm statistics after the kernels of each stage)
  and `set_model_weights` failed or could assign weights to the wrong variables.
  """
  layer.trainable = False
  for sub in layer.submodules:  # Also through lists and dicts.
    if isinstance(sub, tf.keras.layers.Layer):
      sub.trainable = False


class OnlineSamModel(tf.keras.Model):
  """Frozen image encoder + `PromptMaskDecoder`: the model of online mode.

  As in the published federated-SAM recipes, the client model embeds every image at
  every step. Inputs are `PromptMaskDecoder`'s with `pixel_values` (B, 3, S, S)
  (`SamImageProcessor` output) instead of `image_embeddings`; outputs are the same.
  Only the mask decoder is trainable; the encoder's weights are non-trainable.

  Attributes:
    image_encoder: The frozen encoder, pixel values -> embeddings.
    decoder: The `PromptMaskDecoder` (use it for evaluation and export).
  """

  def __init__(self, config, *, encoder: str = sam_lib.VIT_ENCODER,
               prompt: str = config_lib.BOX_PROMPT,
               train_iou_head: bool = True, sub_iterations: int = 3, **kwargs):
    """Builds the architecture (random weights; see `build_online_model`).

    Args:
      config: The `SamConfig`.
      encoder: `vit` (TFSamModel's vision encoder) or `tinyvit` (MobileSAM).
      prompt: Prompt mode.
      train_iou_head: Train the IoU head or freeze it.
      sub_iterations: Decoder passes per step with prompt `iterative`.
    """
    super().__init__(**kwargs)
    self.image_encoder = encoders.build_image_encoder(encoder, config)
    self.encoder_kind = encoder
    freeze(self.image_encoder)
    self.decoder = decoder_lib.PromptMaskDecoder(config, prompt=prompt,
                                                 train_iou_head=train_iou_head,
                                                 sub_iterations=sub_iterations)
    self.built = True

  def embed(self, pixel_values: tf.Tensor) -> tf.Tensor:
    pixel_values = tf.convert_to_tensor(pixel_values, tf.float32)
    if self.encoder_kind == sam_lib.VIT_ENCODER:
      return self.image_encoder(pixel_values, training=False)[0]
    return self.image_encoder(pixel_values)

  def call(self, inputs, training=False):
    decoder_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
    decoder_inputs["image_embeddings"] = self.embed(inputs["pixel_values"])
    return self.decoder(decoder_inputs, training=training)
