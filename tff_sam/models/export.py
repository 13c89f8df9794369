"""Exporting a fine-tuned model as a `save_pretrained` directory.

The export is a `TFSamModel` directory (config + weights) plus the image processor's
config, so `TFSamModel.from_pretrained(DIR)` and `SamProcessor`-style use work
directly, and `--model DIR` works in every tff_sam command. It is written to a
temporary directory and swapped into place, so a crash never leaves a half-written
model.
"""

from pathlib import Path

import tensorflow as tf

from tff_sam import fileio
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import sam as sam_lib


def export_model(*, bundle: sam_lib.SamBundle, decoder: tf.keras.Model,
                 out_dir: Path) -> Path:
  """Writes the bundle's SAM with `decoder`'s prompt/mask-decoder weights to `out_dir`.

  The bundle's own weights are restored afterwards.

  Args:
    bundle: The base model (its image encoder is exported unchanged).
    decoder: A `PromptMaskDecoder` (or `TFSamModel`) holding the weights to export.
    out_dir: Destination directory (replaced atomically if it exists).

  Returns:
    `out_dir`.
  """
  sam = bundle.sam
  backup = decoder_lib.PromptMaskDecoder(sam.config)
  decoder_lib.copy_prompt_decoder_weights(sam, backup)
  decoder_lib.copy_prompt_decoder_weights(decoder, sam)
  try:
    with fileio.atomic_directory(out_dir) as tmp:
      sam.save_pretrained(str(tmp))
      bundle.processor.save_pretrained(str(tmp))
      bundle.save_extras(tmp)
  finally:
    decoder_lib.copy_prompt_decoder_weights(backup, sam)
  return Path(out_dir)
