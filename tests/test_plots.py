"""Pictures: metrics.png and overlays are valid PNGs of the expected size, with integer
round ticks, titled panels and the right per-object Dice."""

import types

import cv2
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from tff_sam.evaluation import plots
from tff_sam.models import losses


def test_plot_metrics_writes_png(tmp_path):
  csv_path = tmp_path / "metrics.csv"
  csv_path.write_text(
      "round,train_loss,train_dice,test_dice,test_iou,seconds\n"
      "0,,,0.5,0.4,\n1,0.9,0.3,,,1.0\n2,0.7,0.4,0.6,0.5,1.1\n")
  out = plots.plot_metrics(csv_path, tmp_path / "metrics.png")
  with Image.open(out) as im:
    assert im.format == "PNG" and im.size == (1000, 360)
  assert not list(tmp_path.glob(".*tmp*"))  # Written atomically, no leftovers.


def _rows(loss: dict, dice: dict) -> list[dict]:
  rounds = sorted(set(loss) | set(dice))
  return [{"round": str(r), "train_loss": str(loss.get(r, "")),
           "test_dice": str(dice.get(r, ""))} for r in rounds]


@pytest.mark.parametrize("rows,shown", [
    # Round 0 evaluates only; evaluation every other round.
    (_rows({1: 0.9, 2: 0.7}, {0: 0.5, 2: 0.6}), [0, 1, 2]),
    # A single round.
    (_rows({1: 0.9}, {0: 0.5, 1: 0.6}), [0, 1]),
    # Evaluation at round 0 only (zero rounds).
    (_rows({}, {0: 0.5}), [0]),
    # Test Dice only at rounds 0 and 10.
    (_rows({r: 1.0 / r for r in range(1, 11)}, {0: 0.5, 10: 0.7}), [0, 10]),
])
def test_metrics_round_ticks_are_integers(rows, shown):
  fig = plots.build_metrics_figure(rows)
  FigureCanvasAgg(fig).draw()
  axes = fig.axes
  assert len(axes) == 2
  assert axes[0].get_xlim() == axes[1].get_xlim()  # Same rounds on both plots.
  for ax in axes:
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= len(shown)
    assert all(float(t).is_integer() for t in ticks), ticks
    assert set(shown) <= {int(t) for t in ticks}
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all(s.replace("\N{MINUS SIGN}", "-").lstrip("-").isdigit()
                          for s in labels), labels


def test_metrics_figure_shows_epsilon_with_differential_privacy():
  rows = _rows({1: 0.9, 2: 0.7}, {0: 0.5, 2: 0.6})
  rows[1]["dp_epsilon"], rows[2]["dp_epsilon"] = "1.5", "2.5"
  fig = plots.build_metrics_figure(rows)
  FigureCanvasAgg(fig).draw()
  assert len(fig.axes) == 3
  eps_axis = fig.axes[2]
  assert eps_axis.get_ylabel().startswith("DP epsilon")
  assert list(eps_axis.lines[0].get_ydata()) == [1.5, 2.5]
  assert eps_axis.get_xlim() == fig.axes[1].get_xlim()
  assert len(plots.build_metrics_figure(_rows({1: 0.9}, {0: 0.5})).axes) == 2  # No DP.


def test_object_dice():
  a = np.zeros((4, 6), bool)
  b = np.zeros((4, 6), bool)
  assert plots.object_dice(a, b) == 1.0  # Both empty.
  a[0, :4] = True
  assert plots.object_dice(a, b) == 0.0
  b[0, 2:6] = True  # 4 and 4 pixels, 2 shared.
  assert plots.object_dice(a, b) == pytest.approx(0.5)
  assert plots.object_dice(a, a) == 1.0
  rng = np.random.default_rng(0)
  for _ in range(5):
    p, t = rng.random((2, 30, 40)) < rng.random()
    assert plots.object_dice(p, t) == pytest.approx(losses.dice_iou(p, t)[0])
  with pytest.raises(ValueError, match="shape"):
    plots.object_dice(a, a[:2])


def test_panel_titles():
  assert plots.panel_titles(0.8712, 0.9349) == [
      "image", "ground truth", "zero-shot  Dice 0.87", "fine-tuned  Dice 0.93"]


def test_overlay_panels_layout():
  image = np.zeros((50, 80, 3), np.uint8)
  mask = np.zeros((50, 80), bool)
  mask[10:20, 30:50] = True
  panel = plots.overlay_panels(image, [mask, mask, ~mask], [(0, 255, 0)] * 3,
                               box=(30, 10, 49, 19), margin=5, min_side=0)
  crop_h, crop_w = 50, 80  # ~mask covers the whole image, so the crop is all of it.
  assert panel.shape == (crop_h, 4 * crop_w + 3 * plots.GAP, 3)
  first = panel[:, :crop_w]
  np.testing.assert_array_equal(first, image)  # Panel 1 is the raw image.
  second = panel[:, crop_w + 4: 2 * crop_w + 4]
  assert second[15, 40, 1] > 0 and second[40, 5].sum() == 0  # Mask coloured, rest not.


def test_overlay_panels_draw_the_point_prompt_on_mask_panels_only():
  image = np.zeros((40, 40, 3), np.uint8)
  mask = np.zeros((40, 40), bool)
  mask[5:30, 5:30] = True
  panel = plots.overlay_panels(image, [~mask, ~mask], [(0, 200, 0)] * 2, point=(12, 20),
                               margin=0, min_side=80)  # Upscaled 2x.
  magenta = np.all(panel == plots.POINT_COLOUR, axis=-1)
  first, second = magenta[:, :80], magenta[:, 80 + plots.GAP:160 + plots.GAP]
  assert not first.any() and second[41, 25]  # (12, 20) -> pixel centre (25, 41).
  ys, xs = np.nonzero(second)
  assert abs(ys.mean() - 41) < 1 and abs(xs.mean() - 25) < 1 and len(ys) < 80


def test_overlay_panels_header():
  image = np.full((50, 80, 3), 100, np.uint8)
  mask = np.zeros((50, 80), bool)
  mask[10:20, 30:50] = True
  args = (image, [mask, mask, mask], [plots.GT_COLOUR, plots.ZERO_SHOT_COLOUR,
                                      plots.FINE_TUNED_COLOUR])
  bare = plots.overlay_panels(*args, box=(30, 10, 49, 19))
  titles = plots.panel_titles(0.5, 1.0)
  panel = plots.overlay_panels(*args, box=(30, 10, 49, 19), titles=titles,
                               legend=plots.LEGEND, caption="img_a  object 1")
  # Default size: the crop (30 x 40 with the margin) upscaled to a 256-pixel short side.
  assert bare.shape[0] >= 256 and bare.shape[1] >= 4 * 256 + 3 * plots.GAP
  header = plots.LEGEND_HEIGHT + plots.TITLE_HEIGHT  # The legend fits on one line.
  assert panel.shape == (bare.shape[0] + header, bare.shape[1], 3)
  np.testing.assert_array_equal(panel[header:], bare)  # Panels unchanged below.
  legend, title_band = panel[:plots.LEGEND_HEIGHT], panel[plots.LEGEND_HEIGHT:header]
  text = (legend > 200).all(axis=-1)  # Light text on the dark band.
  assert text[:, :100].any()  # The caption.
  for _, colour in plots.LEGEND[:3]:  # Filled swatches.
    assert (legend == colour).all(axis=-1).sum() >= 100
  panel_w = (bare.shape[1] - 3 * plots.GAP) // 4
  for j in range(4):  # A title over every panel, coloured rule under the mask panels.
    x = j * (panel_w + plots.GAP)
    assert (title_band[:-3, x:x + panel_w] > 200).all(axis=-1).any()
    if j:
      assert (title_band[-1, x:x + panel_w] == args[2][j - 1]).all()
  different = plots.overlay_panels(*args, box=(30, 10, 49, 19), legend=plots.LEGEND,
                                   titles=plots.panel_titles(0.51, 1.0),
                                   caption="img_a  object 1")
  assert (different[:header] != panel[:header]).any()  # The numbers are drawn.
  with pytest.raises(ValueError, match="titles"):
    plots.overlay_panels(*args, titles=titles[:3])


class _FakeEvaluator:
  """`images` and `predict` of a `heldout.Evaluator` with fixed predictions."""

  def __init__(self, image_path, labels, predictions):
    self.images = [types.SimpleNamespace(
        example=types.SimpleNamespace(image_path=image_path, stem="img_a"),
        labels=labels, ids=np.array([1, 2]))]
    self._predictions = predictions
    self.prompts = []

  def predict(self, model, image, eval_prompt=None):
    assert image is self.images[0]
    self.prompts.append(eval_prompt)
    return self._predictions[model]


def test_write_overlays_titles_carry_object_dice(tmp_path, monkeypatch):
  labels = np.zeros((40, 60), np.uint16)
  labels[10:20, 10:20] = 1  # 100 pixels.
  labels[25:35, 35:55] = 2  # 200 pixels, so drawn first.
  zero = np.zeros((2, 40, 60), bool)
  zero[0, 10:20, 15:25] = True  # Half of object 1: Dice 2 * 50 / 200.
  tuned = np.stack([labels == 1, np.zeros((40, 60), bool)])
  tuned[1, 25:35, 35:45] = True  # Half of object 2: Dice 2 * 100 / 300.
  image_path = tmp_path / "img_a.png"
  image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
  cv2.imwrite(str(image_path), image[..., ::-1])
  evaluator = _FakeEvaluator(image_path, labels, {"zero": zero, "tuned": tuned})

  calls = []
  real = plots.overlay_panels

  def recording(*args, **kwargs):
    calls.append(kwargs)
    return real(*args, **kwargs)

  monkeypatch.setattr(plots, "overlay_panels", recording)
  paths = plots.write_overlays(tmp_path / "overlays", evaluator=evaluator,
                               zero_shot_model="zero", fine_tuned_model="tuned")
  assert [p.name for p in paths] == ["img_a_obj2.png", "img_a_obj1.png"]
  assert [c["titles"] for c in calls] == [
      ["image", "ground truth", "zero-shot  Dice 0.00", "fine-tuned  Dice 0.67"],
      ["image", "ground truth", "zero-shot  Dice 0.50", "fine-tuned  Dice 1.00"]]
  assert [c["caption"] for c in calls] == ["img_a  object 2", "img_a  object 1"]
  assert all(c["legend"] == plots.LEGEND for c in calls)
  assert all(c["point"] is None and c["box"] is not None for c in calls)
  # With point prompts the point is drawn instead of the box, and asked for.
  calls.clear()
  plots.write_overlays(tmp_path / "points", evaluator=evaluator, zero_shot_model="zero",
                       fine_tuned_model="tuned", eval_prompt="point")
  assert all(c["box"] is None and c["legend"] == plots.POINT_LEGEND for c in calls)
  assert [tuple(c["point"]) for c in calls] == [(39, 29), (14, 14)]  # Most interior pixels.
  assert evaluator.prompts[-2:] == ["point", "point"]
  header = plots.LEGEND_HEIGHT + plots.TITLE_HEIGHT
  for path in paths:
    with Image.open(path) as im:
      assert im.format == "PNG"
      width, height = im.size
      pixels = np.asarray(im.convert("RGB"))
    panel_w = (width - 3 * plots.GAP) // 4
    assert min(panel_w, height - header) >= 256  # Readable: was ~160 px, no header.
    np.testing.assert_array_equal(pixels[-1, panel_w:panel_w + plots.GAP],
                                  np.full((plots.GAP, 3), plots.BACKGROUND))
    assert (pixels[:header] == plots.BACKGROUND).all(axis=-1).mean() > 0.7  # Dark header.
