"""The settings of automatic segmentation (`automatic`), apart so that binaries check
them before TensorFlow loads."""

import dataclasses

from tff_sam import errors


@dataclasses.dataclass(frozen=True)
class AutomaticSettings:
  """How masks are proposed and filtered (SAM's defaults).

  Attributes:
    points_per_side: The grid has points_per_side² points per crop.
    points_per_batch: Points per decoder call.
    pred_iou_thresh: Keep masks whose predicted IoU is at least this.
    stability_score_thresh: Keep masks whose stability score is at least this.
    stability_score_offset: The logit offset of the stability score.
    box_nms_thresh: Box IoU above which the lower-scored of two masks is dropped.
    crop_n_layers: Layers of crops: layer i splits the image into (2**i)² crops.
    crop_nms_thresh: `box_nms_thresh` between masks of different crops.
    crop_overlap_ratio: Overlap of neighbouring crops, a share of the image's side.
    crop_n_points_downscale_factor: Layer i has points_per_side / factor**i per side.
    min_mask_region_area: Remove islands and holes smaller than this (pixels; 0 = off).
    max_mask_fraction: Drop masks covering more than this share of the image: SAM
      segments the background of microscopy images as one more object (micro-sam
      takes the largest object for background; this drops only one that large).
      1.0 keeps every mask.
  """

  points_per_side: int = 32
  points_per_batch: int = 64
  pred_iou_thresh: float = 0.88
  stability_score_thresh: float = 0.95
  stability_score_offset: float = 1.0
  box_nms_thresh: float = 0.7
  crop_n_layers: int = 0
  crop_nms_thresh: float = 0.7
  crop_overlap_ratio: float = 512 / 1500
  crop_n_points_downscale_factor: int = 1
  min_mask_region_area: int = 0
  max_mask_fraction: float = 0.5

  def validate(self) -> "AutomaticSettings":
    """Returns self, or raises `errors.ConfigError` naming the first bad setting."""
    for name in ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor"):
      errors.require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
    for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh",
                 "crop_nms_thresh"):
      value = getattr(self, name)
      errors.require(0.0 <= value <= 1.0, name, f"must be in [0, 1], got {value}")
    errors.require(0.0 < self.max_mask_fraction <= 1.0, "max_mask_fraction",
                   f"must be in (0, 1], got {self.max_mask_fraction}")
    errors.require(0.0 <= self.crop_overlap_ratio < 1.0, "crop_overlap_ratio",
                   f"must be in [0, 1), got {self.crop_overlap_ratio}")
    for name in ("crop_n_layers", "min_mask_region_area"):
      errors.require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
    errors.require(self.stability_score_offset > 0, "stability_score_offset",
                   f"must be > 0, got {self.stability_score_offset}")
    return self
