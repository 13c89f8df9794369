"""The flags of automatic segmentation, shared by `segment`, `evaluate` and `run`
(`--eval_prompt=automatic`): one definition, SAM's defaults (`config.AutomaticSettings`).

Importing this module defines them; `settings()` reads them.
"""

from absl import flags

from tff_sam import config as config_lib

_D = config_lib.AutomaticSettings

flags.DEFINE_integer("points_per_side", _D.points_per_side, "Automatic segmentation: the "
                     "point grid has this many points per side (SAM's default 32: 1024 "
                     "prompts; 16 is 4x faster).")
flags.DEFINE_integer("points_per_batch", _D.points_per_batch, "Point prompts per decoder call.")
flags.DEFINE_float("pred_iou_thresh", _D.pred_iou_thresh,
                   "Keep masks whose predicted IoU is at least this (SAM's 0.88 suits "
                   "SAM's own IoU head; a fine-tuned head predicts lower IoUs: try 0.7).")
flags.DEFINE_float("stability_score_thresh", _D.stability_score_thresh,
                   "Keep masks whose stability score (how little the mask changes when its "
                   "logit threshold moves by 1) is at least this.")
flags.DEFINE_float("box_nms_thresh", _D.box_nms_thresh,
                   "Box IoU above which the lower-scored of two masks is dropped.")
flags.DEFINE_integer("crop_n_layers", _D.crop_n_layers, "Also segment overlapping crops: "
                     "layer i splits the image into (2**i)^2 crops (0 = the whole image only).")
flags.DEFINE_integer("min_mask_region_area", _D.min_mask_region_area,
                     "Remove islands and holes smaller than this many pixels (0 = off).")
flags.DEFINE_float("max_mask_fraction", _D.max_mask_fraction,
                   "Drop masks covering more than this share of the image (SAM segments the "
                   "background as one more object); 1.0 keeps every mask.")

FLAGS = flags.FLAGS


def settings() -> config_lib.AutomaticSettings:
  """The flags as validated settings (raises `errors.ConfigError` naming a bad one)."""
  return config_lib.AutomaticSettings(
      **{name: FLAGS[name].value for name in config_lib.AUTOMATIC_SETTINGS}).validate()
