r"""Segment objects in an image (or a folder of images) with box and/or point prompts.

  python -m tff_sam.experiments.predict --model runs/demo/model --image cells.png \
      --box 10,20,80,95 [--box ...] [--point 40,50[,1] ...] --output overlay.png \
      [--mask_out mask.png]

Each --box is one object. --point clicks (label 1 = object, 0 = background; default 1)
all refine one object: alone, or with exactly one --box. With --image DIR every image in
DIR gets the same prompts and --output (and --mask_out) name folders. The mask is a
16-bit label PNG of the image's size: object k (in prompt order) has value k.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF and TFF's C++ worker: errors only.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # No TF-deprecation banner.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from tff_sam import config as config_lib
from tff_sam import runtime
from tff_sam import errors

flags.DEFINE_string("model", config_lib.MOBILE_SAM_MODEL, config_lib.MODEL_HELP)
flags.DEFINE_string("image", None, "An image file, or a folder of images (batch mode).")
flags.DEFINE_multi_string("box", [], "x0,y0,x1,y1 in image pixels; one object per --box.")
flags.DEFINE_multi_string("point", [], "x,y[,label] in image pixels; label 1 (default) = "
                          "object, 0 = background.")
flags.DEFINE_string("output", "overlay.png", "Overlay PNG (a folder in batch mode).")
flags.DEFINE_string("mask_out", None, "Optional label-mask PNG (a folder in batch mode).")
flags.DEFINE_string("cache_dir", None, "Cache root (default $TFF_SAM_CACHE or ~/.cache/tff_sam).")

FLAGS = flags.FLAGS


def _numbers(text: str, flag: str, counts: tuple[int, ...]) -> list[float]:
  try:
    values = [float(v) for v in text.split(",")]
  except ValueError:
    values = []
  if len(values) not in counts:
    raise errors.ConfigError(flag, f"cannot parse {text!r} (expected {' or '.join(str(c) for c in counts)} "
                             "comma-separated numbers)")
  return values


def _settings() -> tuple[list, list]:
  """(boxes, points) parsed from their flags, `--image` checked."""
  if not FLAGS.image:
    raise errors.ConfigError("image", "is required")
  return ([_numbers(b, "box", (4,)) for b in FLAGS.box],
          [_numbers(p, "point", (2, 3)) for p in FLAGS.point])


def main(argv):
  runtime.begin_binary(argv)

  def job(prompts: tuple[list, list]):
    # lazy: TensorFlow loads only after the flags are checked.
    from tff_sam.evaluation import inference  # pylint: disable=g-import-not-at-top
    boxes, points = prompts
    written = inference.predict_paths(
        model=FLAGS.model, image=FLAGS.image, boxes=boxes, points=points,
        output=FLAGS.output, mask_out=FLAGS.mask_out, cache_dir=FLAGS.cache_dir)
    for path in written:
      print(path)

  return runtime.run_job(job, settings=_settings)


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
