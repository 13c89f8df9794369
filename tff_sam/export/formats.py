"""The export formats of `python -m tff_sam.experiments.export --format=...`.

Each writer takes a loaded model (`tff_sam.models.build.load_sam`, e.g. of a run's
`model/`) and writes into a fresh folder, atomically:

* `sam_checkpoint`: `sam_checkpoint.safetensors`, the original repositories' state
  dict (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`): segment-anything's
  builders for ViT models, MobileSAM's `build_sam_vit_t` for MobileSAM models, load it
  with `model.load_state_dict(safetensors.torch.load_file(path))`.
* `onnx`: `image_encoder.onnx` (`pixel_values` (1, 3, S, S) -> `image_embeddings`)
  and `sam_decoder.onnx`, the prompt encoder + mask decoder with segment-anything's
  ONNX signature (`graphs.SamOnnxDecoder`), converted with tf2onnx.
* `saved_model`: a TF SavedModel whose `serving_default` signature takes `image`
  (H, W, 3) uint8 and `boxes` (K, 4) in image pixels and returns `masks` (K, H, W)
  at the original size (`graphs.SamServing`); `tf.saved_model.load(DIR)`.
"""

from pathlib import Path
from typing import Callable, Optional

import onnx
import tensorflow as tf
import tf2onnx

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam import fileio
from tff_sam.export import graphs
from tff_sam.export import torch_layout
from tff_sam.models import build
from tff_sam.models import mobile_sam
from tff_sam.models import sam as sam_lib

SAM_CHECKPOINT = "sam_checkpoint.safetensors"
ONNX_ENCODER = "image_encoder.onnx"
ONNX_DECODER = "sam_decoder.onnx"
SAVED_MODEL = "saved_model"
ONNX_OPSET = 17


def write_sam_checkpoint(bundle: sam_lib.SamBundle, out_dir: Path, *,
                         cache_dir: Optional[Path] = None) -> list[Path]:
  """`out_dir/sam_checkpoint.safetensors` in SAM's (or MobileSAM's) layout."""
  extras = (mobile_sam.unused_image_encoder_tensors(cache_dir=cache_dir)
            if bundle.image_encoder is not None else None)
  state = torch_layout.sam_state_dict(bundle.sam, bundle.image_encoder, extras)
  return [torch_layout.save_safetensors(Path(out_dir) / SAM_CHECKPOINT, state)]


def _onnx(function, signature: list[tf.TensorSpec], path: Path,
          outputs: tuple[str, ...]) -> Path:
  """Converts `function` (returning a dict) to ONNX with the outputs in this order."""
  model, _ = tf2onnx.convert.from_function(function, input_signature=signature,
                                           opset=ONNX_OPSET)
  by_name = {o.name: o for o in model.graph.output}
  if set(by_name) != set(outputs):
    raise ValueError(f"ONNX outputs {sorted(by_name)}, expected {sorted(outputs)}")
  ordered = [onnx.ValueInfoProto.FromString(by_name[n].SerializeToString()) for n in outputs]
  del model.graph.output[:]
  model.graph.output.extend(ordered)
  onnx.checker.check_model(model)
  with fileio.atomic_path(path, suffix=".onnx") as tmp:
    onnx.save(model, str(tmp))
  return path


def write_onnx(bundle: sam_lib.SamBundle, out_dir: Path, **_) -> list[Path]:
  """`image_encoder.onnx` and `sam_decoder.onnx` (module docstring)."""
  decoder = graphs.SamOnnxDecoder(
      build.build_prompt_mask_decoder(bundle, prompt=config_lib.BOTH_PROMPTS))
  encoder = graphs.encoder_function(bundle)
  return [_onnx(encoder, list(encoder.input_signature), Path(out_dir) / ONNX_ENCODER,
                outputs=("image_embeddings",)),
          _onnx(tf.function(decoder.__call__), decoder.signature(),
                Path(out_dir) / ONNX_DECODER, outputs=graphs.ONNX_DECODER_OUTPUTS)]


def write_saved_model(bundle: sam_lib.SamBundle, out_dir: Path, **_) -> list[Path]:
  """A SavedModel with the `serving_default` image + boxes -> masks signature."""
  module = graphs.SamServing(
      bundle, build.build_prompt_mask_decoder(bundle, prompt=config_lib.BOX_PROMPT))
  path = Path(out_dir) / SAVED_MODEL
  with fileio.atomic_directory(path) as tmp:
    tf.saved_model.save(module, str(tmp), signatures={"serving_default": module.segment})
  return [path]


WRITERS: dict[str, Callable[..., list[Path]]] = {
    config_lib.SAM_CHECKPOINT_FORMAT: write_sam_checkpoint,
    config_lib.ONNX_FORMAT: write_onnx,
    config_lib.SAVED_MODEL_FORMAT: write_saved_model,
}


def export(*, model: str, export_format: str, output_dir: Path,
           cache_dir: Optional[Path] = None) -> list[Path]:
  """Loads `model` (a name or directory) and writes it in `export_format`.

  Raises:
    errors.ConfigError: An unknown format (`--format`).
    errors.ModelError: The model cannot be loaded (e.g. a folder that is not a model).
  """
  if export_format not in WRITERS:
    raise errors.ConfigError("format", f"must be one of {config_lib.EXPORT_FORMATS}, "
                             f"got {export_format!r}")
  bundle = build.load_sam(model, cache_dir=cache_dir)
  output_dir = Path(output_dir).expanduser()
  output_dir.mkdir(parents=True, exist_ok=True)
  return WRITERS[export_format](bundle, output_dir, cache_dir=cache_dir)
