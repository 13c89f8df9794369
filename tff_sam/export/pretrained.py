"""Exporting a fine-tuned model as a folder that transformers loads in TF and PyTorch.

`export_model` writes, atomically (a temporary folder swapped into place, so a crash
never leaves a half-written model):

* `config.json`, `tf_model.h5`: `TFSamModel.save_pretrained`;
* `pytorch_model.bin`: the same weights in transformers' PyTorch `SamModel` layout,
  every parameter and buffer, written in `torch.save`'s zip format without torch
  (`torch_checkpoint.save_torch_state_dict`), so `SamModel.from_pretrained(DIR)` works
  in an environment without TensorFlow. Not `model.safetensors`: transformers 4.x's
  TF `from_pretrained` prefers any `model.safetensors` in a folder over
  `tf_model.h5`, and its PyTorch-safetensors reader fails ("'builtins.safe_open'
  object is not iterable"), so that file would break `TFSamModel.from_pretrained`;
* `preprocessor_config.json`: the `SamImageProcessor`;
* `README.md`: what is where and how to load it;
* with `--adapter=lora`, `adapter/`: the LoRA adapters alone (`lora.save_adapter`);
  the image encoder in the folder already carries them merged
  (`build.merged_bundle`), so every loader reads it without adapter code.

MobileSAM-style models (TinyViT image encoder, which transformers' SAM classes do not
have) also get `tinyvit.npz` + `tff_sam_image_encoder.json` (the Keras port,
`tff_sam.models.build.load_sam(DIR)` loads both) and `image_encoder.safetensors`
(the TinyViT in MobileSAM's own PyTorch layout, its unused classification head
included). The `TFSamModel`/`SamModel` in such a folder keeps only a stand-in ViT
that cannot segment; so that it can never silently give empty masks, the exported
config sets the stand-in's `vision_config.image_size` to `STAND_IN_IMAGE_SIZE`:
pixel values of SAM's 1024 frame are then refused (TF: "Shape of tensor ... is not
compatible with expected shape [?,3,16,16]"; PyTorch: "Input image size (1024*1024)
doesn't match model (16*16)"), while `image_embeddings=` from the TinyViT work.
"""

from pathlib import Path
from typing import Optional

import tensorflow as tf

from tff_sam import fileio
from tff_sam.export import torch_layout
from tff_sam.models import adapted as adapted_lib
from tff_sam.models import build
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import lora
from tff_sam.models import mobile_sam
from tff_sam.models import sam as sam_lib
from tff_sam.models import tinyvit_weights
from tff_sam.models import torch_checkpoint

STAND_IN_IMAGE_SIZE = 16
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_IMAGE_ENCODER = "image_encoder.safetensors"
MODEL_CARD = "README.md"
ADAPTER_DIR = "adapter"
_ADAPTED = (f"; LoRA adapters in its image encoder were trained too, and are merged into "
            f"its weights here (`{ADAPTER_DIR}/` holds them alone)")


def _model_card(bundle: sam_lib.SamBundle, adapted: bool) -> str:
  if bundle.image_encoder is None:
    return f"""# SAM fine-tuned with tff_sam

Base model: `{bundle.name}`. The mask decoder was fine-tuned with federated
averaging{_ADAPTED if adapted else "; the image encoder is unchanged"}.

* TensorFlow: `TFSamModel.from_pretrained(DIR)` and `SamProcessor` (this folder).
* PyTorch: `SamModel.from_pretrained(DIR)` (reads `{TORCH_WEIGHTS}`).
* tff_sam: `--model DIR` in every command.
* Other formats: `python -m tff_sam.experiments.export --model DIR --format=...`
  (`sam_checkpoint`, `onnx`, `saved_model`).
"""
  return f"""# MobileSAM fine-tuned with tff_sam

Base model: `{bundle.name}`. The mask decoder was fine-tuned with federated
averaging{_ADAPTED if adapted else "; the TinyViT image encoder is unchanged"}.

transformers' SAM classes have no TinyViT. The `TFSamModel`/`SamModel` in this folder
hold the fine-tuned prompt encoder and mask decoder and a stand-in image encoder that
refuses pixel values (its config's image size is {STAND_IN_IMAGE_SIZE}); give them
`image_embeddings` computed by the TinyViT:

* TensorFlow with tff_sam: `tff_sam.models.build.load_sam(DIR)` (TinyViT from
  `tinyvit.npz`), or `--model DIR` in every command.
* PyTorch: `{TORCH_IMAGE_ENCODER}` is the TinyViT in MobileSAM's layout; with MobileSAM's
  code, `python -m tff_sam.experiments.export --model DIR --format=sam_checkpoint`
  writes the whole model as one MobileSAM checkpoint.
* ONNX (image encoder + SAM's decoder signature) and a TF SavedModel (image + boxes ->
  masks): `--format=onnx`, `--format=saved_model`.
"""


def export_model(*, bundle: sam_lib.SamBundle, decoder: tf.keras.Model, out_dir: Path,
                 cache_dir: Optional[Path] = None,
                 adapted: Optional[adapted_lib.AdaptedSamModel] = None) -> Path:
  """Writes the bundle's SAM with `decoder`'s prompt/mask-decoder weights to `out_dir`.

  The bundle's own weights and config are restored afterwards.

  Args:
    bundle: The base model; its image encoder is exported as it is, unless
      `adapted` is given.
    decoder: A `PromptMaskDecoder` (or `TFSamModel`) holding the weights to export.
    out_dir: Destination directory (replaced atomically if it exists).
    cache_dir: Cache root holding MobileSAM's pinned checkpoint (MobileSAM-style
      models copy its unused image-encoder tensors from there).
    adapted: An `AdaptedSamModel` of the bundle (`--adapter=lora`): its adapters are
      merged into the exported image encoder and also saved alone in `ADAPTER_DIR`.

  Returns:
    `out_dir`.
  """
  base_name = bundle.name
  if adapted is not None:
    bundle = build.merged_bundle(bundle, lora.merged_deltas(adapted.adapters))
  sam = bundle.sam
  backup = decoder_lib.PromptMaskDecoder(sam.config)
  decoder_lib.copy_prompt_decoder_weights(sam, backup)
  decoder_lib.copy_prompt_decoder_weights(decoder, sam)
  vision = sam.config.vision_config
  image_size = vision.image_size
  try:
    with fileio.atomic_directory(out_dir) as tmp:
      if bundle.image_encoder is not None:
        vision.image_size = STAND_IN_IMAGE_SIZE
        torch_layout.save_safetensors(
            tmp / TORCH_IMAGE_ENCODER,
            {**mobile_sam.unused_image_encoder_tensors(cache_dir=cache_dir),
             **tinyvit_weights.torch_state_dict(bundle.image_encoder)})
      sam.save_pretrained(str(tmp))
      torch_checkpoint.save_torch_state_dict(tmp / TORCH_WEIGHTS, torch_layout.hf_state_dict(sam))
      bundle.processor.save_pretrained(str(tmp))
      bundle.save_extras(tmp)
      if adapted is not None:
        lora.save_adapter(tmp / ADAPTER_DIR, adapted.adapters, spec=adapted.lora,
                          image_encoder=adapted.encoder_kind, base_model=base_name)
      fileio.write_text(tmp / MODEL_CARD, _model_card(bundle, adapted is not None))
  finally:
    vision.image_size = image_size
    decoder_lib.copy_prompt_decoder_weights(backup, sam)
  return Path(out_dir)
