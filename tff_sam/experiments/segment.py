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
from tff_sam.evaluation import automatic_settings

flags.DEFINE_string("model", config_lib.MOBILE_SAM_MODEL, config_lib.MODEL_HELP)
flags.DEFINE_string("input", None, "An image file, or a folder of images.")
flags.DEFINE_string("output_dir", None, "Folder for the label images and overlays.")
flags.DEFINE_integer("points_per_side", 32, "The point grid has this many points per side "
                     "(SAM's default 32: 1024 prompts; 16 is 4x faster).")
flags.DEFINE_integer("points_per_batch", 64, "Point prompts per decoder call.")
flags.DEFINE_float("pred_iou_thresh", 0.88, "Keep masks whose predicted IoU is at least this.")
flags.DEFINE_float("stability_score_thresh", 0.95,
                   "Keep masks whose stability score (how little the mask changes when its "
                   "logit threshold moves by 1) is at least this.")
flags.DEFINE_float("box_nms_thresh", 0.7,
                   "Box IoU above which the lower-scored of two masks is dropped.")
flags.DEFINE_integer("crop_n_layers", 0, "Also segment overlapping crops: layer i splits the "
                     "image into (2**i)^2 crops (0 = the whole image only).")
flags.DEFINE_integer("min_mask_region_area", 0,
                     "Remove islands and holes smaller than this many pixels (0 = off).")
flags.DEFINE_float("max_mask_fraction", 0.5,
                   "Drop masks covering more than this share of the image (SAM segments the "
                   "background as one more object); 1.0 keeps every mask.")
flags.DEFINE_string("cache_dir", None, "Cache root (default $TFF_SAM_CACHE or ~/.cache/tff_sam).")

FLAGS = flags.FLAGS
SETTINGS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh",
            "box_nms_thresh", "crop_n_layers", "min_mask_region_area", "max_mask_fraction")


def _settings():
  """The generator's settings from the flags, checked; `--input`/`--output_dir` given."""
  for name in ("input", "output_dir"):
    if not getattr(FLAGS, name):
      raise errors.ConfigError(name, "is required")
  return automatic_settings.AutomaticSettings(**{k: getattr(FLAGS, k) for k in SETTINGS}).validate()


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
