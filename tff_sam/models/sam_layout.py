"""The original SAM checkpoint layout (segment-anything, MobileSAM) next to HF's.

SAM's and MobileSAM's PyTorch state dicts name the prompt encoder and mask decoder
`prompt_encoder.*` / `mask_decoder.*` (and the image encoder `image_encoder.*`);
transformers' `TFSamModel` holds the same tensors under other names and layouts.
This module is the one place for that correspondence, both ways:

* `prompt_decoder_target_name` / `prompt_decoder_weight_map`: SAM key -> TF weight
  name (the rules of HF's `convert_sam_to_hf.py`), and `to_tf_layout` /
  `to_torch_layout` for the tensors (Linear and Conv kernels are transposed);
* `prompt_decoder_keys(config)`: every SAM key of a config's prompt encoder and mask
  decoder, so a TF model can be written back in SAM's layout;
* `vit_sam_key`: HF's PyTorch name of a ViT image-encoder tensor -> SAM's key.
"""

import re
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

PROMPT_DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")

# Source (MobileSAM / original SAM key) -> TF weight name relative to the model, as
# regex rewrite rules; HF's convert_sam_to_hf.py documents the same renames. Linear
# weights become `kernel`s, LayerNormalization (the transformer's norms) uses
# gamma/beta, TFSamLayerNorm (mask embedding, upscaling) keeps weight/bias.
_PROJ = r"(q_proj|k_proj|v_proj|out_proj)"
_RULES: List[Tuple[str, str]] = [
    (r"prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix",
     "shared_image_embedding/positional_embedding"),
    (r"prompt_encoder\.point_embeddings\.(\d+)\.weight", r"prompt_encoder/point_embed_._\1.weight"),
    (r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder/\1.weight"),
    (r"prompt_encoder\.mask_downscaling\.0\.weight", "prompt_encoder/mask_embed/conv1/kernel"),
    (r"prompt_encoder\.mask_downscaling\.0\.bias", "prompt_encoder/mask_embed/conv1/bias"),
    (r"prompt_encoder\.mask_downscaling\.1\.(weight|bias)",
     r"prompt_encoder/mask_embed/layer_norm1/\1"),
    (r"prompt_encoder\.mask_downscaling\.3\.weight", "prompt_encoder/mask_embed/conv2/kernel"),
    (r"prompt_encoder\.mask_downscaling\.3\.bias", "prompt_encoder/mask_embed/conv2/bias"),
    (r"prompt_encoder\.mask_downscaling\.4\.(weight|bias)",
     r"prompt_encoder/mask_embed/layer_norm2/\1"),
    (r"prompt_encoder\.mask_downscaling\.6\.weight", "prompt_encoder/mask_embed/conv3/kernel"),
    (r"prompt_encoder\.mask_downscaling\.6\.bias", "prompt_encoder/mask_embed/conv3/bias"),
    (r"mask_decoder\.(iou_token|mask_tokens)\.weight", r"mask_decoder/\1.weight"),
    (rf"mask_decoder\.transformer\.layers\.(\d+)\.(self_attn|cross_attn_token_to_image|"
     rf"cross_attn_image_to_token)\.{_PROJ}\.weight",
     r"mask_decoder/transformer/layers_._\1/\2/\3/kernel"),
    (rf"mask_decoder\.transformer\.layers\.(\d+)\.(self_attn|cross_attn_token_to_image|"
     rf"cross_attn_image_to_token)\.{_PROJ}\.bias",
     r"mask_decoder/transformer/layers_._\1/\2/\3/bias"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.weight",
     r"mask_decoder/transformer/layers_._\1/layer_norm\2/gamma"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.norm(\d)\.bias",
     r"mask_decoder/transformer/layers_._\1/layer_norm\2/beta"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin1|lin2)\.weight",
     r"mask_decoder/transformer/layers_._\1/mlp/\2/kernel"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin1|lin2)\.bias",
     r"mask_decoder/transformer/layers_._\1/mlp/\2/bias"),
    (rf"mask_decoder\.transformer\.final_attn_token_to_image\.{_PROJ}\.weight",
     r"mask_decoder/transformer/final_attn_token_to_image/\1/kernel"),
    (rf"mask_decoder\.transformer\.final_attn_token_to_image\.{_PROJ}\.bias",
     r"mask_decoder/transformer/final_attn_token_to_image/\1/bias"),
    (r"mask_decoder\.transformer\.norm_final_attn\.weight",
     "mask_decoder/transformer/layer_norm_final_attn/gamma"),
    (r"mask_decoder\.transformer\.norm_final_attn\.bias",
     "mask_decoder/transformer/layer_norm_final_attn/beta"),
    (r"mask_decoder\.output_upscaling\.0\.weight", "mask_decoder/upscale_conv1/kernel"),
    (r"mask_decoder\.output_upscaling\.0\.bias", "mask_decoder/upscale_conv1/bias"),
    (r"mask_decoder\.output_upscaling\.1\.(weight|bias)", r"mask_decoder/upscale_layer_norm/\1"),
    (r"mask_decoder\.output_upscaling\.3\.weight", "mask_decoder/upscale_conv2/kernel"),
    (r"mask_decoder\.output_upscaling\.3\.bias", "mask_decoder/upscale_conv2/bias"),
]
# SAM's 3-layer MLP heads: layers.0 -> proj_in, layers.1 -> layers_._0, layers.2 -> proj_out.
_MLP_HEAD = re.compile(
    r"mask_decoder\.(output_hypernetworks_mlps\.(\d+)|iou_prediction_head)\.layers\.(\d+)\."
    r"(weight|bias)")
_MLP_LAYER_NAMES = {"0": "proj_in", "1": "layers_._0", "2": "proj_out"}


def prompt_decoder_target_name(source_key: str) -> Optional[str]:
  """Returns the `TFSamModel` weight name (e.g. `mask_decoder/.../kernel`) for a key.

  Args:
    source_key: A `prompt_encoder.*`/`mask_decoder.*` key of MobileSAM or SAM.

  Returns:
    The weight name relative to the model (no model-name prefix, no `:0`), or None
    for a key that has no counterpart.
  """
  m = _MLP_HEAD.fullmatch(source_key)
  if m:
    head = (f"output_hypernetworks_mlps_._{m.group(2)}" if m.group(2) is not None else
            "iou_prediction_head")
    layer = _MLP_LAYER_NAMES.get(m.group(3))
    if layer is None:
      return None
    return f"mask_decoder/{head}/{layer}/{'kernel' if m.group(4) == 'weight' else 'bias'}"
  for pattern, repl in _RULES:
    if re.fullmatch(pattern, source_key):
      return re.sub(f"^{pattern}$", repl, source_key)
  return None


def prompt_decoder_weight_map(source_keys: Iterable[str]) -> Dict[str, Optional[str]]:
  """Maps each `prompt_encoder.*`/`mask_decoder.*` key to its TF weight name.

  Args:
    source_keys: State-dict keys; others (e.g. `image_encoder.*`) are skipped.

  Returns:
    Source key -> TF weight name relative to the model, None where no rule applies.
  """
  return {k: prompt_decoder_target_name(k) for k in source_keys
          if k.startswith(PROMPT_DECODER_PREFIXES)}


def to_tf_layout(value: np.ndarray, target: str) -> np.ndarray:
  """A SAM (PyTorch) tensor in the layout of the TF weight `target`."""
  if target.endswith("/kernel"):
    if value.ndim == 2:  # Linear (out, in) -> Dense (in, out).
      return value.T
    if value.ndim == 4:  # Conv2d (O, I, kh, kw) and ConvTranspose2d (I, O, kh, kw).
      return np.transpose(value, (2, 3, 1, 0))
  return value


def to_torch_layout(value: np.ndarray, target: str) -> np.ndarray:
  """Inverse of `to_tf_layout`: a TF weight's value in SAM's (PyTorch) layout."""
  if target.endswith("/kernel"):
    if value.ndim == 2:  # Dense (in, out) -> Linear (out, in).
      return np.ascontiguousarray(value.T)
    if value.ndim == 4:  # (kh, kw, I, O) -> Conv2d (O, I, kh, kw); also ConvTranspose2d.
      return np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
  return np.ascontiguousarray(value)


def prompt_decoder_keys(config) -> List[str]:
  """Every `prompt_encoder.*` / `mask_decoder.*` key of SAM's layout for a `SamConfig`."""
  prompt, dec = config.prompt_encoder_config, config.mask_decoder_config
  keys = ["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
          "prompt_encoder.not_a_point_embed.weight", "prompt_encoder.no_mask_embed.weight"]
  keys += [f"prompt_encoder.point_embeddings.{i}.weight"
           for i in range(prompt.num_point_embeddings)]
  keys += [f"prompt_encoder.mask_downscaling.{i}.{p}" for i in (0, 1, 3, 4, 6)
           for p in ("weight", "bias")]
  wb = ("weight", "bias")
  for i in range(dec.num_hidden_layers):
    layer = f"mask_decoder.transformer.layers.{i}"
    for attn in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
      keys += [f"{layer}.{attn}.{proj}_proj.{p}" for proj in ("q", "k", "v", "out") for p in wb]
    keys += [f"{layer}.norm{n}.{p}" for n in (1, 2, 3, 4) for p in wb]
    keys += [f"{layer}.mlp.lin{n}.{p}" for n in (1, 2) for p in wb]
  keys += [f"mask_decoder.transformer.final_attn_token_to_image.{proj}_proj.{p}"
           for proj in ("q", "k", "v", "out") for p in wb]
  keys += [f"mask_decoder.transformer.norm_final_attn.{p}" for p in wb]
  keys += ["mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"]
  keys += [f"mask_decoder.output_upscaling.{i}.{p}" for i in (0, 1, 3) for p in wb]
  heads = [f"output_hypernetworks_mlps.{j}" for j in range(dec.num_multimask_outputs + 1)]
  heads.append("iou_prediction_head")
  keys += [f"mask_decoder.{h}.layers.{n}.{p}" for h in heads for n in range(3) for p in wb]
  return keys


# HF's PyTorch ViT image encoder names -> SAM's (the inverse of convert_sam_to_hf.py).
_VIT_RENAMES: Tuple[Tuple[str, str], ...] = (
    (r"^vision_encoder\.", "image_encoder."),
    (r"\.patch_embed\.projection\.", ".patch_embed.proj."),
    (r"\.layers\.(\d+)\.layer_norm(\d)\.", r".blocks.\1.norm\2."),
    (r"\.layers\.(\d+)\.", r".blocks.\1."),
    (r"\.neck\.conv1\.", ".neck.0."),
    (r"\.neck\.layer_norm1\.", ".neck.1."),
    (r"\.neck\.conv2\.", ".neck.2."),
    (r"\.neck\.layer_norm2\.", ".neck.3."),
)


def vit_sam_key(hf_torch_name: str) -> str:
  """SAM's `image_encoder.*` key of an HF PyTorch `vision_encoder.*` tensor name."""
  key = hf_torch_name
  for pattern, repl in _VIT_RENAMES:
    key = re.sub(pattern, repl, key)
  return key
