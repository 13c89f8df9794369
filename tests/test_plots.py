"""Pictures: metrics.png and overlays are valid PNGs of the expected size."""

import numpy as np
from PIL import Image

from tff_sam.evaluation import plots


def test_plot_metrics_writes_png(tmp_path):
  csv_path = tmp_path / "metrics.csv"
  csv_path.write_text(
      "round,train_loss,train_dice,test_dice,test_iou,seconds\n"
      "0,,,0.5,0.4,\n1,0.9,0.3,,,1.0\n2,0.7,0.4,0.6,0.5,1.1\n")
  out = plots.plot_metrics(csv_path, tmp_path / "metrics.png")
  with Image.open(out) as im:
    assert im.format == "PNG" and im.size == (1000, 360)
  assert not list(tmp_path.glob(".*tmp*"))  # Written atomically, no leftovers.


def test_overlay_panels_layout():
  image = np.zeros((50, 80, 3), np.uint8)
  mask = np.zeros((50, 80), bool)
  mask[10:20, 30:50] = True
  panel = plots.overlay_panels(image, [mask, mask, ~mask], [(0, 255, 0)] * 3,
                               box=(30, 10, 49, 19), margin=5, min_side=0)
  crop_h, crop_w = 50, 80  # ~mask covers the whole image, so the crop is all of it.
  assert panel.shape == (crop_h, 4 * crop_w + 3 * 4, 3)
  first = panel[:, :crop_w]
  np.testing.assert_array_equal(first, image)  # Panel 1 is the raw image.
  second = panel[:, crop_w + 4: 2 * crop_w + 4]
  assert second[15, 40, 1] > 0 and second[40, 5].sum() == 0  # Mask coloured, rest not.
