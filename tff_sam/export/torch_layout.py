"""A TF SAM's weights in PyTorch layouts, as numpy arrays (no torch needed).

* `hf_state_dict`: transformers' PyTorch `SamModel` state dict, every parameter and
  buffer (`SamModel.from_pretrained` of a folder with `model.safetensors`);
* `sam_state_dict`: the original repositories' layout (`image_encoder.*`,
  `prompt_encoder.*`, `mask_decoder.*`), which segment-anything's and MobileSAM's
  builders load (`model.load_state_dict(safetensors.torch.load_file(path))`);
* `save_safetensors`: writes such a dict with the `{"format": "pt"}` metadata
  transformers expects.

Names and layouts come from transformers' own TF->PyTorch name conversion
(`convert_tf_weight_name_to_pt_weight_name`, `apply_transpose`) and from
`tff_sam.models.sam_layout` (SAM's keys).
"""

from pathlib import Path
from typing import Optional

import numpy as np
import tensorflow as tf
from safetensors.numpy import save_file
from transformers.modeling_tf_pytorch_utils import apply_transpose
from transformers.modeling_tf_pytorch_utils import convert_tf_weight_name_to_pt_weight_name

from tff_sam import fileio
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import sam_layout
from tff_sam.models import tinyvit
from tff_sam.models import tinyvit_weights

# PyTorch's SamPromptEncoder holds its own copy of the positional-embedding buffer,
# tied to `shared_image_embedding.positional_embedding` (TF shares one layer).
TIED_BUFFER = "prompt_encoder.shared_embedding.positional_embedding"
SHARED_BUFFER = "shared_image_embedding.positional_embedding"


def hf_state_dict(sam: tf.keras.Model) -> dict[str, np.ndarray]:
  """transformers' PyTorch `SamModel` state dict of a `TFSamModel` (float32).

  Args:
    sam: A built `TFSamModel`.

  Returns:
    PyTorch name -> array in PyTorch layout, the tied prompt-encoder buffer included.

  Raises:
    ValueError: Two TF weights map to one PyTorch name.
  """
  vision = sam.config.vision_config
  # TF's vision attention holds relative-position tables even when they are unused;
  # PyTorch's creates them (and the absolute one) only when the config uses them.
  unused = (() if vision.use_rel_pos else (".attn.rel_pos_h", ".attn.rel_pos_w")) + (
      () if vision.use_abs_pos else ("vision_encoder.pos_embed",))
  out: dict[str, np.ndarray] = {}
  for weight in sam.weights:
    name, transpose = convert_tf_weight_name_to_pt_weight_name(
        weight.name, tf_weight_shape=weight.shape)
    if name.endswith(unused):
      continue
    if name in out:
      raise ValueError(f"{weight.name}: PyTorch name {name} is taken")
    value = apply_transpose(transpose, weight.numpy(), pt_to_tf=False)
    out[name] = np.ascontiguousarray(value, dtype=np.float32)
  out[TIED_BUFFER] = out[SHARED_BUFFER]
  return out


def sam_state_dict(sam: tf.keras.Model, image_encoder: Optional[tinyvit.TinyViT] = None,
                   image_encoder_extras: Optional[dict[str, np.ndarray]] = None
                   ) -> dict[str, np.ndarray]:
  """The original SAM / MobileSAM state dict of a `TFSamModel` (and TinyViT encoder).

  Args:
    sam: A built `TFSamModel` (its prompt encoder and mask decoder; its ViT image
      encoder unless `image_encoder` is given).
    image_encoder: MobileSAM's TinyViT, written as `image_encoder.*` in MobileSAM's
      layout instead of the ViT.
    image_encoder_extras: Further `image_encoder.*` tensors (relative names) that the
      TinyViT port does not hold but MobileSAM's strict loader expects (its unused
      classification head, BatchNorm counters).

  Returns:
    SAM key -> array in PyTorch layout.

  Raises:
    ValueError: A prompt-encoder/decoder weight has no SAM key or the reverse.
  """
  weights = decoder_lib.prompt_decoder_weights(sam)
  out: dict[str, np.ndarray] = {}
  for key in sam_layout.prompt_decoder_keys(sam.config):
    target = sam_layout.prompt_decoder_target_name(key)
    if target not in weights:
      raise ValueError(f"{key}: no TF weight {target}")
    out[key] = sam_layout.to_torch_layout(weights[target].numpy().astype(np.float32), target)
  covered = {sam_layout.prompt_decoder_target_name(k) for k in out}
  left = sorted(set(weights) - covered)
  if left:
    raise ValueError(f"TF weights without a SAM key: {', '.join(left[:8])}")
  if image_encoder is not None:
    for name, value in {**(image_encoder_extras or {}),
                        **tinyvit_weights.torch_state_dict(image_encoder)}.items():
      out[f"image_encoder.{name}"] = value
  else:
    for name, value in hf_state_dict(sam).items():
      if name.startswith("vision_encoder."):
        out[sam_layout.vit_sam_key(name)] = value
  return out


def save_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
  """Writes `tensors` atomically as a PyTorch-format safetensors file."""
  with fileio.atomic_path(path, suffix=".safetensors") as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
  return Path(path)
