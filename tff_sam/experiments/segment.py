r"""Segment every object of an image (or a folder of images) without prompts.

  python -m tff_sam.experiments.segment --model runs/demo/model --input cells/ \
      --output_dir segmented/

SAM's automatic mask generation with a pretrained or fine-tuned model: a grid of point
prompts, filtered by predicted IoU and stability, deduplicated by non-maximum
suppression (`tff_sam/evaluation/automatic.py`). Per image: OUT/<stem>_labels.png
(16-bit instance labels of the image's size) and OUT/<stem>_overlay.png, and a line
with its object count and seconds.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF and TFF's C++ worker: errors only.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # No TF-deprecation banner.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam import runtime
from tff_sam.experiments import automatic_flags

flags.DEFINE_string("model", config_lib.MOBILE_SAM_MODEL, config_lib.MODEL_HELP)
flags.DEFINE_string("input", None, "An image file, or a folder of images.")
flags.DEFINE_string("output_dir", None, "Folder for the label images and overlays.")
flags.DEFINE_string("cache_dir", None, "Cache root (default $TFF_SAM_CACHE or ~/.cache/tff_sam).")

FLAGS = flags.FLAGS


def _settings():
  """The generator's settings from the flags, checked; `--input`/`--output_dir` given."""
  for name in ("input", "output_dir"):
    if not getattr(FLAGS, name):
      raise errors.ConfigError(name, "is required")
  return automatic_flags.settings()


def main(argv):
  runtime.begin_binary(argv)

  def job(settings):
    # lazy: TensorFlow loads only after the flags are checked.
    from tff_sam.evaluation import inference  # pylint: disable=g-import-not-at-top
    done = inference.segment_paths(model=FLAGS.model, source=FLAGS.input,
                                   output_dir=FLAGS.output_dir, settings=settings,
                                   cache_dir=FLAGS.cache_dir)
    total = sum(d["seconds"] for d in done)
    print(f"segmented {len(done)} image(s), {sum(d['objects'] for d in done)} objects, "
          f"{total / max(1, len(done)):.1f} s per image -> {FLAGS.output_dir}")

  return runtime.run_job(job, settings=_settings)


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
