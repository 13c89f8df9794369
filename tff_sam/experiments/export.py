r"""Write a model (e.g. a run's model/) in another format.

  python -m tff_sam.experiments.export --model runs/demo/model \
      --format=sam_checkpoint|onnx|saved_model [--output_dir DIR]

A run's model/ already holds transformers' TF (`tf_model.h5`) and PyTorch
(`pytorch_model.bin`) layouts. Each format writes into OUTPUT_DIR:

  sam_checkpoint  sam_checkpoint.safetensors: the original SAM / MobileSAM state dict
  onnx            image_encoder.onnx and sam_decoder.onnx (segment-anything's decoder)
  saved_model     saved_model/: a TF SavedModel (image + boxes -> masks)

Default output: MODEL/../exports/FORMAT for a model directory. Prints the files written.
"""

import os
from pathlib import Path
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF and TFF's C++ worker: errors only.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # No TF-deprecation banner.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam import runtime

flags.DEFINE_string("model", None, "A model directory (a run's model/), or any --model of "
                    "run: mobile_sam, tiny, a hub id.")
flags.DEFINE_string("format", None, f"One of {', '.join(config_lib.EXPORT_FORMATS)}.")
flags.DEFINE_string("output_dir", None, "Where the files go (default: MODEL/../exports/"
                    "FORMAT for a model directory).")
flags.DEFINE_string("cache_dir", None, "Cache root (default $TFF_SAM_CACHE or ~/.cache/tff_sam).")

FLAGS = flags.FLAGS


def _settings() -> tuple[Path, Optional[Path]]:
  """(output folder, cache folder), the flags checked."""
  if not FLAGS.model:
    raise errors.ConfigError("model", "is required")
  if FLAGS.format not in config_lib.EXPORT_FORMATS:
    raise errors.ConfigError("format", f"must be one of {config_lib.EXPORT_FORMATS}, "
                             f"got {FLAGS.format!r}")
  model = Path(FLAGS.model).expanduser()
  output = FLAGS.output_dir
  if output is None:
    if not model.is_dir():
      raise errors.ConfigError("output_dir", "is required when --model is not a directory")
    output = model.parent / "exports" / FLAGS.format
  return Path(output), Path(FLAGS.cache_dir).expanduser() if FLAGS.cache_dir else None


def main(argv):
  runtime.begin_binary(argv)

  def job(folders: tuple[Path, Optional[Path]]):
    # lazy: TensorFlow loads only after the flags are checked.
    from tff_sam.export import formats  # pylint: disable=g-import-not-at-top
    output, cache = folders
    for path in formats.export(model=FLAGS.model, export_format=FLAGS.format,
                               output_dir=output, cache_dir=cache):
      print(path)

  return runtime.run_job(job, settings=_settings)


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
