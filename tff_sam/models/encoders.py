"""The two image encoders behind one interface: SAM's ViT and MobileSAM's TinyViT.

An encoder kind (`sam.VIT_ENCODER`, `sam.TINYVIT_ENCODER`) names the architecture:
`TFSamVisionEncoder` (transformers' SAM ViT, sized by the `SamConfig`) or this
project's TinyViT port. Both can be split between two stages of their forward pass,
`features(..., start)` then `from_features(..., start)`, which together equal the whole
encoder; the split is where the adapted model's feature cache cuts
(`tff_sam.models.adapted`). `start` counts transformer blocks in the ViT (0: the patch
embedding plus absolute positions) and stages in TinyViT (0: the patch embedding).
"""

import re
from typing import Callable, Tuple

import tensorflow as tf
from transformers.models.sam.modeling_tf_sam import TFSamVisionEncoder

from tff_sam.models import sam as sam_lib
from tff_sam.models import tinyvit

_VIT_NAME = re.compile(r"(?:^|/)vision_encoder(?:_\d+)?/(.+?)(?::\d+)?$")


def build_image_encoder(kind: str, config) -> tf.keras.layers.Layer:
  """A fresh encoder of `kind` for SAM config `config`, every weight created (random)."""
  if kind == sam_lib.VIT_ENCODER:
    encoder = TFSamVisionEncoder(config.vision_config, name="vision_encoder")
    with tf.name_scope(encoder.name):
      encoder.build(None)
    return encoder
  if kind == sam_lib.TINYVIT_ENCODER:
    return tinyvit.build_tinyvit(sam_lib.image_size(config))
  raise ValueError(f"unknown image encoder {kind!r}")


def weight_names(encoder: tf.keras.layers.Layer, kind: str) -> dict[int, str]:
  """`id(variable)` -> the weight's name inside the encoder, for every base weight.

  ViT: the weight's name below the vision encoder (`layers_._0/attn/qkv/kernel`),
  whatever scope the encoder was built in; TinyViT: its key in MobileSAM's state dict
  without `image_encoder.` (`layers.1.blocks.0.attn.qkv.weight`). Adapter weights
  (`tff_sam.models.lora`) are not base weights and are not named.
  """
  if kind == sam_lib.TINYVIT_ENCODER:
    return {id(var): name for name, var, _ in encoder.torch_params()}
  names = {}
  for var in encoder.weights:
    if "lora_" in var.name:  # An adapter's A or B.
      continue
    match = _VIT_NAME.search(var.name)
    if match is None:
      raise ValueError(f"{var.name}: not a weight of a vision encoder")
    names[id(var)] = match.group(1)
  return names


def features(encoder: tf.keras.layers.Layer, kind: str, pixel_values: tf.Tensor, *,
             start: int) -> tf.Tensor:
  """The encoder's activations at `start`, channels last: (B, h, w, c)."""
  if kind == sam_lib.TINYVIT_ENCODER:
    return encoder.features(pixel_values, stage=start)
  hidden = encoder.patch_embed(tf.convert_to_tensor(pixel_values, tf.float32))
  if encoder.pos_embed is not None:
    hidden = hidden + encoder.pos_embed
  for layer in encoder.layers[:start]:
    hidden = layer(hidden, training=False)[0]
  return hidden


def from_features(encoder: tf.keras.layers.Layer, kind: str, hidden: tf.Tensor, *,
                  start: int) -> tf.Tensor:
  """The image embeddings (B, C, s, s) from `features(..., start=start)`."""
  if kind == sam_lib.TINYVIT_ENCODER:
    return encoder.from_features(hidden, stage=start)
  for layer in encoder.layers[start:]:
    hidden = layer(hidden, training=False)[0]
  return encoder.neck(hidden)


def embed(encoder: tf.keras.layers.Layer, kind: str, pixel_values: tf.Tensor) -> tf.Tensor:
  """The whole encoder: pixel values (B, 3, S, S) -> embeddings (B, C, s, s)."""
  return from_features(encoder, kind, features(encoder, kind, pixel_values, start=0), start=0)


def cut_shape(kind: str, config, *, start: int) -> Tuple[int, int, int]:
  """(h, w, c) of one image's `features(..., start=start)`."""
  if kind == sam_lib.TINYVIT_ENCODER:
    return tinyvit.feature_shape(sam_lib.image_size(config), start)
  vision = config.vision_config
  side = vision.image_size // vision.patch_size
  return (side, side, vision.hidden_size)


def first_block_stage(kind: str) -> int:
  """The first `start` whose stage holds transformer blocks (where adapters can go).

  TinyViT's stage 0 is convolutional (MBConv); its transformer blocks start at stage 1.
  The ViT is transformer blocks throughout.
  """
  return 1 if kind == sam_lib.TINYVIT_ENCODER else 0


def bundle_encoder(bundle: sam_lib.SamBundle) -> tf.keras.layers.Layer:
  """The encoder holding a bundle's pretrained image-encoder weights."""
  return bundle.image_encoder if bundle.image_encoder is not None else bundle.sam.vision_encoder


def feature_fn(bundle: sam_lib.SamBundle, *, start: int) -> Callable[[tf.Tensor], tf.Tensor]:
  """A compiled `features(..., start=start)` of the bundle's frozen encoder."""
  encoder, kind = bundle_encoder(bundle), sam_lib.encoder_kind(bundle)
  side = sam_lib.image_size(bundle.config)
  return tf.function(lambda px: features(encoder, kind, px, start=start),
                     input_signature=[tf.TensorSpec([None, 3, side, side], tf.float32)])


def describe_start(kind: str, start: int) -> str:
  """Where `features(..., start=start)` cuts, in words."""
  if kind == sam_lib.TINYVIT_ENCODER:
    return f"the input of TinyViT's stage {start}"
  return ("the ViT's patch embeddings" if start == 0 else
          f"the input of the ViT's block {start}")
