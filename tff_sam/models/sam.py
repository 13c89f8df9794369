"""SAM's configuration helpers and the loaded-model bundle.

* Shapes of a `SamConfig`: the input frame (`image_size`), the low-resolution mask
  frame (`low_res_size`), one image embedding (`embedding_shape`); the matching
  `SamImageProcessor` (`build_image_processor`); the tiny random-init config used by
  tests (`tiny_sam_config`).
* `SamBundle`: a `TFSamModel` (config, prompt encoder, mask decoder), the image
  encoder that computes embeddings, the processor and a fingerprint that keys the
  embedding cache. `tff_sam.models.build.load_sam` makes bundles from names.
"""

import dataclasses
import functools
from pathlib import Path
from typing import Callable, Optional

import tensorflow as tf
from transformers import SamConfig, SamImageProcessor, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig  # pylint: disable=g-multiple-import

from tff_sam import fileio
from tff_sam.models import tinyvit_weights

# A save_pretrained directory whose image encoder is not TFSamModel's ViT carries this
# file (and the encoder's weights) next to config.json.
ENCODER_FILE = "tff_sam_image_encoder.json"
TINYVIT_WEIGHTS = "tinyvit.npz"
# Kinds of image encoder (`encoder_kind`): TFSamModel's ViT, MobileSAM's TinyViT.
VIT_ENCODER = "vit"
TINYVIT_ENCODER = "tinyvit"


def tiny_sam_config():
  """A small random-init SAM (hidden sizes in the tens, 256-pixel input).

  Image embeddings are 64x16x16 and low-resolution masks 64x64, so model tests run
  in seconds with no downloads, yet boxes of the synthetic shapes span several
  embedding cells.
  """
  vision = SamVisionConfig(
      hidden_size=32, output_channels=64, num_hidden_layers=2, num_attention_heads=2,
      mlp_dim=64, image_size=256, patch_size=16, window_size=4, global_attn_indexes=[1],
      num_pos_feats=32)
  # mask_input_channels 8: the mask embedding's first conv has 8 // 4 = 2 channels; with
  # 1 its layer norm would map every mask prompt to the same embedding.
  prompt = SamPromptEncoderConfig(
      hidden_size=64, image_size=256, patch_size=16, mask_input_channels=8)
  decoder = SamMaskDecoderConfig(
      hidden_size=64, mlp_dim=128, num_hidden_layers=2, num_attention_heads=2,
      iou_head_hidden_dim=64)
  return SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                   mask_decoder_config=decoder.to_dict())


def image_size(config) -> int:
  """Side of SAM's square input frame (1024 for the released models)."""
  return int(config.prompt_encoder_config.image_size)


def low_res_size(config) -> int:
  """Side of the low-resolution mask frame the decoder predicts (256 for SAM)."""
  return 4 * int(config.prompt_encoder_config.image_embedding_size)


def embedding_shape(config) -> tuple[int, int, int]:
  """(channels, height, width) of one image embedding."""
  side = int(config.prompt_encoder_config.image_embedding_size)
  return (int(config.mask_decoder_config.hidden_size), side, side)


def build_image_processor(config):
  """A `SamImageProcessor` for a SAM config (SAM's defaults at 1024 input).

  Images: longest side to `image_size`, rescale, ImageNet normalize, pad to square.
  Masks (segmentation maps): nearest resize to the low-resolution frame, pad.
  """
  side, low = image_size(config), low_res_size(config)
  return SamImageProcessor(
      size={"longest_edge": side}, pad_size={"height": side, "width": side},
      mask_size={"longest_edge": low}, mask_pad_size={"height": low, "width": low})


@dataclasses.dataclass
class SamBundle:
  """A loaded SAM and everything needed to use it.

  Attributes:
    name: What the user asked for (`tiny`, a hub id, a directory).
    sam: The `TFSamModel`; its prompt encoder and mask decoder hold the pretrained
      weights. Its own vision encoder is used unless `image_encoder` is set.
    image_encoder: Optional replacement encoder (e.g. MobileSAM's TinyViT):
      pixel_values (B, 3, S, S) -> embeddings (B, C, s, s).
    processor: The matching `SamImageProcessor`.
    fingerprint: Hash of the encoder weights and preprocessing: embeddings cached
      under one fingerprint are valid only for this encoder.
  """

  name: str
  sam: tf.keras.Model
  processor: object
  fingerprint: str
  image_encoder: Optional[tf.keras.Model] = None

  @property
  def config(self):
    return self.sam.config

  def save_extras(self, directory: Path) -> None:
    """Writes what `save_pretrained` does not hold: a replacement image encoder."""
    if self.image_encoder is None:
      return
    tinyvit_weights.save_tinyvit_weights(self.image_encoder, Path(directory) / TINYVIT_WEIGHTS)
    fileio.write_json(Path(directory) / ENCODER_FILE, {
        "image_encoder": TINYVIT_ENCODER, "weights": TINYVIT_WEIGHTS,
        "note": "MobileSAM-style model: TFSamModel holds the prompt encoder and mask "
                "decoder; compute image embeddings with tff_sam.models.tinyvit."})

  def encoder_fn(self) -> Callable[[tf.Tensor], tf.Tensor]:
    """The bundle's one compiled function pixel_values -> image embeddings.

    Built on first use and reused for the whole run (every site, the test set,
    evaluation), so the encoder is traced once.
    """
    return self._encoder_function

  @functools.cached_property
  def _encoder_function(self) -> Callable[[tf.Tensor], tf.Tensor]:
    side = image_size(self.config)
    signature = [tf.TensorSpec([None, 3, side, side], tf.float32)]
    if self.image_encoder is not None:
      encoder = self.image_encoder
      return tf.function(lambda px: encoder(px), input_signature=signature)
    sam = self.sam
    return tf.function(lambda px: sam.get_image_embeddings(px), input_signature=signature)


def encoder_kind(bundle: SamBundle) -> str:
  """`tinyvit` for a bundle with MobileSAM's encoder, else `vit`."""
  return TINYVIT_ENCODER if bundle.image_encoder is not None else VIT_ENCODER
