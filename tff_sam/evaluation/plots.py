"""Pictures of a run: the metrics curve and prediction overlays.

* `plot_metrics`: `metrics.png`, training loss and held-out Dice per round, with the
  zero-shot Dice as a dashed line; rounds are whole numbers on both x axes.
* `write_overlays`: one PNG per selected test object, four panels side by side:
  image, ground truth, zero-shot prediction, fine-tuned prediction (crops around the
  object upscaled to a readable size, masks drawn in colour with their outline, prompt
  box in white). A dark header carries the image name, a colour legend and a title
  over each panel with the prediction's Dice against the ground truth.
"""

import csv
from pathlib import Path
from typing import Mapping, Optional, Sequence

import cv2
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tff_sam import fileio
from tff_sam import config as config_lib
from tff_sam.data import preprocess
from tff_sam.data import reading

GT_COLOUR = (0, 200, 0)
ZERO_SHOT_COLOUR = (230, 140, 0)
FINE_TUNED_COLOUR = (30, 120, 255)
BOX_COLOUR = (255, 255, 255)
POINT_COLOUR = (255, 40, 220)
LEGEND = (("ground truth", GT_COLOUR), ("zero-shot", ZERO_SHOT_COLOUR),
          ("fine-tuned", FINE_TUNED_COLOUR), ("prompt box", BOX_COLOUR))
POINT_LEGEND = LEGEND[:3] + (("prompt point", POINT_COLOUR),)

BACKGROUND = (32, 32, 32)  # Header bands and the gaps between panels.
TEXT_COLOUR = (240, 240, 240)
SEPARATOR = (90, 90, 90)
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.55
MIN_FONT_SCALE = 0.35
GAP = 4
PAD = 6  # Text padding inside the header bands.
TITLE_HEIGHT = 26
LEGEND_HEIGHT = 26


def read_metrics(metrics_csv: Path) -> list[dict[str, str]]:
  """The rows of `metrics.csv` as dicts of strings."""
  with open(metrics_csv) as f:
    return list(csv.DictReader(f))


def _series(rows: Sequence[Mapping], key: str) -> list[tuple[int, float]]:
  return [(int(r["round"]), float(r[key])) for r in rows
          if r.get(key) is not None and r.get(key) != ""]


def build_metrics_figure(rows: Sequence[Mapping]) -> Figure:
  """The metrics figure: training loss (left; with DP, epsilon on its right axis) and
  held-out Dice (right; with validation, its Dice too) per round.

  Args:
    rows: `metrics.csv` rows (dicts with `round` and optional `train_loss`,
      `test_dice`, `val_dice`, `dp_epsilon`; empty strings or missing keys are skipped).

  Returns:
    A 10 x 3.6 inch figure whose round axes show integer ticks only, over the same
    round range on both plots.
  """
  loss = _series(rows, "train_loss")
  dice = _series(rows, "test_dice")
  fig = Figure(figsize=(10, 3.6))
  ax1, ax2 = fig.subplots(1, 2)
  if loss:
    ax1.plot(*zip(*loss), marker="o", color="tab:red")
  ax1.set(title="training loss (clients' mean)", xlabel="round", ylabel="loss")
  if dice:
    ax2.plot(*zip(*dice), marker="o", color="tab:blue", label="held-out Dice")
    zero = [d for r, d in dice if r == 0]
    if zero:
      ax2.axhline(zero[0], ls="--", color="gray", label=f"zero-shot {zero[0]:.3f}")
  validation = _series(rows, "val_dice")
  if validation:  # --validation_fraction: what --keep_best chooses on.
    ax2.plot(*zip(*validation), marker="^", color="tab:orange",
             label="validation Dice (federated, low resolution)")
  if dice or validation:
    ax2.legend(loc="best")
  ax2.set(title="held-out Dice (original resolution)", xlabel="round", ylabel="Dice")
  epsilon = _series(rows, "dp_epsilon")
  if epsilon:  # Differential privacy: the privacy spent, on the loss plot's right axis.
    ax3 = ax1.twinx()
    ax3.plot(*zip(*epsilon), marker="s", ls="--", color="tab:green")
    ax3.set_ylabel("DP epsilon (privacy spent)", color="tab:green")
    ax3.set_ylim(bottom=0)
    ax1.set_title("training loss (clients' mean) and DP epsilon")
  rounds = [int(r["round"]) for r in rows]
  for ax in fig.axes:
    if ax in (ax1, ax2):
      ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10], min_n_ticks=1))
    if rounds:
      lo, hi = min(rounds), max(rounds)
      pad = max(0.5, 0.05 * (hi - lo))
      ax.set_xlim(lo - pad, hi + pad)
  fig.tight_layout()
  return fig


def plot_metrics(metrics_csv: Path, out_png: Path) -> Path:
  """Draws training loss and test Dice per round from `metrics.csv` (atomically).

  Returns:
    `out_png`, a 1000 x 360 PNG.
  """
  fig = build_metrics_figure(read_metrics(metrics_csv))
  with fileio.atomic_path(out_png, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=100, format="png")
  return Path(out_png)


def prompt_title(prompt: str) -> str:
  """How tables and plots name an evaluation prompt: "box prompts", "automatic
  segmentation"."""
  return ("automatic segmentation" if prompt == config_lib.AUTOMATIC_EVAL
          else f"{prompt} prompts")


def _comparison_panels(table: Mapping, metric: str) -> list[tuple[str, Mapping, str]]:
  """(title, rows, metric) of each panel: per prompt, every held-out client, then the
  own-site view when the table has one; `automatic` shows mSA."""
  panels = []
  for prompt, part in table.items():
    shown = metric if config_lib.headline_metric(prompt) == "dice" else "msa"
    what = prompt_title(prompt)
    panels.append((f"held-out {shown} ({what}; every held-out client)", part["rows"], shown))
    own = part.get("own_site", {}).get("rows")
    if own:
      panels.append((f"held-out {shown} ({what}; each site on its own client)", own, shown))
  return panels


def _draw_bars(ax, rows: Mapping, metric: str, title: str) -> None:
  """One bar per row (x axis) and column ("all" first), the zero-shot "all" dashed."""
  names = list(rows)
  clients = list(rows[names[0]][metric])
  width = 0.8 / max(1, len(clients))
  for j, client in enumerate(clients):
    means = [rows[n][metric][client]["mean"] or 0.0 for n in names]
    stds = [rows[n][metric][client]["std"] or 0.0 for n in names]
    ax.bar(np.arange(len(names)) + (j - (len(clients) - 1) / 2) * width, means, width,
           yerr=stds, capsize=3, label=client)
  zero = rows.get("zero_shot", {}).get(metric, {}).get("all", {}).get("mean")
  if zero is not None:
    ax.axhline(zero, ls="--", color="gray", lw=1)
  values = [rows[n][metric][c]["mean"] for n in names for c in clients
            if rows[n][metric][c]["mean"] is not None]
  if values:
    lo = min(values)
    ax.set_ylim(max(0.0, lo - 0.15 * (1.0 - lo) - 0.02), 1.0)
  ax.set_xticks(np.arange(len(names)), [n.replace("/", "\n") for n in names], fontsize=8)
  ax.set(title=title, ylabel=metric)
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # Beside the bars.


def build_comparison_figure(table: Mapping, metric: str = "dice") -> Figure:
  """Bars of `metric` per arm and evaluation client (error bars: std over seeds).

  Args:
    table: `federated.compare.summarize`'s result (evaluation prompt -> rows, and the
      own-site view when sites were matched to held-out clients).
    metric: `dice`, `iou`, `msa` or `sa50`.

  Returns:
    Per evaluation prompt a panel of every held-out client and, with an own-site
    view, a panel of each site's model on its own client: arms on the x axis, one
    bar per column ("all" first), the zero-shot mean of "all" as a dashed line.
  """
  panels = _comparison_panels(table, metric)
  fig = Figure(figsize=(max(6.0, 1.3 * max(len(rows) for _, rows, _ in panels) + 2),
                        3.8 * len(panels)))
  for ax, (title, rows, shown) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0],
                                      panels):
    _draw_bars(ax, rows, shown, title)
  fig.tight_layout()
  return fig


def plot_comparison(table: Mapping, out_png: Path, metric: str = "dice") -> Path:
  """Draws `build_comparison_figure` into `out_png` (atomically); returns the path."""
  fig = build_comparison_figure(table, metric)
  with fileio.atomic_path(out_png, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=100, format="png")
  return Path(out_png)


def plot_label_curve(curve: Mapping, out_png: Path, *, subtitle: str = "") -> Path:
  """Held-out Dice against labelled images per site, one line per arm (error bars: std
  over seeds), one panel per evaluation prompt (`compare.label_curve`'s result), drawn
  into `out_png` atomically; returns the path. `subtitle` follows each panel's title
  (e.g. the view and the seeds)."""
  prompts = list(curve)
  fig = Figure(figsize=(6.5, 3.6 * len(prompts)))
  for ax, prompt in zip(fig.subplots(len(prompts), 1, squeeze=False)[:, 0], prompts):
    counts = sorted({c for rows in curve[prompt].values() for c in rows},
                    key=lambda c: float("inf") if c == "all" else int(c))
    for name, by_count in curve[prompt].items():
      xs = [i for i, c in enumerate(counts) if by_count.get(c, {}).get("mean") is not None]
      ax.errorbar(xs, [by_count[counts[i]]["mean"] for i in xs],
                  yerr=[by_count[counts[i]]["std"] or 0.0 for i in xs], marker="o",
                  capsize=3, label=name, ls="--" if name == "zero_shot" else "-")
    ax.set_xticks(range(len(counts)), counts)
    ax.set(title=prompt_title(prompt) + (f" ({subtitle})" if subtitle else ""),
           xlabel="labelled training images per site",
           ylabel="held-out " + ("Dice" if config_lib.headline_metric(prompt) == "dice"
                                 else "mSA"))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
  fig.tight_layout()
  with fileio.atomic_path(out_png, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=100, format="png")
  return Path(out_png)


def object_dice(pred: np.ndarray, gt: np.ndarray) -> float:
  """Dice 2|A∩B| / (|A| + |B|) of two boolean masks of the same shape (1.0 if both empty)."""
  pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
  if pred.shape != gt.shape:
    raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
  total = int(pred.sum()) + int(gt.sum())
  if total == 0:
    return 1.0
  return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def panel_titles(zero_shot_dice: float, fine_tuned_dice: float) -> list[str]:
  """Titles of the four overlay panels."""
  return ["image", "ground truth", f"zero-shot  Dice {zero_shot_dice:.2f}",
          f"fine-tuned  Dice {fine_tuned_dice:.2f}"]


def _blend(image: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
  out = image.astype(np.float32)
  out[mask] = 0.55 * out[mask] + 0.45 * np.asarray(colour, np.float32)
  out = out.astype(np.uint8)
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
  cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 1)
  return out


def _fit_scale(text: str, width: int) -> float:
  """The font scale (at most `FONT_SCALE`) at which `text` fits in `width` pixels."""
  (w, _), _ = cv2.getTextSize(text, FONT, FONT_SCALE, 1)
  return max(MIN_FONT_SCALE, min(FONT_SCALE, FONT_SCALE * width / max(1, w)))


def _put_text(canvas: np.ndarray, text: str, x: int, y_mid: int, scale: float = FONT_SCALE,
              colour=TEXT_COLOUR) -> int:
  """Draws `text` vertically centred on `y_mid` from `x`; returns its right end."""
  (w, h), _ = cv2.getTextSize(text, FONT, scale, 1)
  cv2.putText(canvas, text, (x, y_mid + h // 2), FONT, scale, colour, 1, cv2.LINE_AA)
  return x + w


def _band(height: int, width: int) -> np.ndarray:
  return np.full((height, width, 3), BACKGROUND, np.uint8)


def _title_band(titles: Sequence[str], widths: Sequence[int],
                colours: Sequence[Optional[tuple]]) -> np.ndarray:
  """One title per panel, centred over it, with the panel's colour underlined."""
  band = _band(TITLE_HEIGHT, sum(widths) + GAP * (len(widths) - 1))
  x = 0
  for title, w, colour in zip(titles, widths, colours):
    scale = _fit_scale(title, w - 2 * PAD)
    (tw, _), _ = cv2.getTextSize(title, FONT, scale, 1)
    _put_text(band, title, x + max(PAD, (w - tw) // 2), TITLE_HEIGHT // 2 - 1, scale)
    if colour is not None:
      band[-3:, x:x + w] = colour
    x += w + GAP
  return band


def _legend_band(width: int, legend: Sequence[tuple[str, tuple]],
                 caption: Optional[str]) -> np.ndarray:
  """The caption, then a swatch and label per legend entry, wrapping onto more lines."""
  items = ([(caption, None)] if caption else []) + list(legend)
  sizes = []
  for label, colour in items:
    (tw, _), _ = cv2.getTextSize(label, FONT, FONT_SCALE, 1)
    sizes.append(tw + (18 if colour is not None else 0))
  lines, x = [[]], PAD
  for item, size in zip(items, sizes):
    if lines[-1] and x + size > width - PAD:
      lines.append([])
      x = PAD
    lines[-1].append((item, x))
    x += size + (32 if item[1] is None else 18)
  band = _band(LEGEND_HEIGHT * len(lines), width)
  for row, line in enumerate(lines):
    y_mid = row * LEGEND_HEIGHT + LEGEND_HEIGHT // 2
    for (label, colour), x in line:
      if colour is not None:
        corners = (x, y_mid - 6), (x + 12, y_mid + 6)
        if colour == BOX_COLOUR:  # The prompt box is drawn as an outline.
          cv2.rectangle(band, *corners, colour, 1)
        else:
          cv2.rectangle(band, *corners, colour, -1)
        x += 18
      _put_text(band, label, x, y_mid)
  band[-1] = SEPARATOR  # Divides the legend from the panel titles.
  return band


def overlay_panels(image: np.ndarray, masks: Sequence[np.ndarray], colours,
                   box=None, margin: int = 24, min_side: int = 256, *, point=None,
                   titles: Optional[Sequence[str]] = None,
                   legend: Optional[Sequence[tuple[str, tuple]]] = None,
                   caption: Optional[str] = None) -> np.ndarray:
  """Side-by-side crops: the image, then the image with each mask overlaid.

  Args:
    image: uint8 RGB (H, W, 3).
    masks: Boolean (H, W) masks, one panel each.
    colours: RGB colour of each mask.
    box: Optional XYXY prompt box (original pixels), drawn in white on mask panels.
    point: Optional XY prompt point (original pixels), drawn as a dot on mask panels.
    margin: Pixels kept around the union of the masks.
    min_side: The crop is upscaled (nearest neighbour) until its short side has at
      least this many pixels.
    titles: Optional title of each panel (`len(masks) + 1`), drawn on a dark band
      above the panels.
    legend: Optional (label, colour) swatches drawn on a dark band at the top.
    caption: Optional text (e.g. the image name) at the start of the legend band.

  Returns:
    uint8 RGB: [legend band], [title band], then the panels separated by
    `GAP`-pixel dark gaps.
  """
  h, w = image.shape[:2]
  union = np.any(np.stack(masks), axis=0)
  ys, xs = np.nonzero(union) if union.any() else (np.array([0, h - 1]), np.array([0, w - 1]))
  y0, y1 = max(0, ys.min() - margin), min(h, ys.max() + margin + 1)
  x0, x1 = max(0, xs.min() - margin), min(w, xs.max() + margin + 1)
  panels = [image[y0:y1, x0:x1]]
  for mask, colour in zip(masks, colours):
    panel = _blend(image, mask, colour)[y0:y1, x0:x1].copy()
    if box is not None:
      bx0, by0, bx1, by1 = (int(round(v)) for v in box)
      cv2.rectangle(panel, (bx0 - x0, by0 - y0), (bx1 - x0, by1 - y0), BOX_COLOUR, 1)
    panels.append(panel)
  scale = max(1.0, min_side / max(1, min(y1 - y0, x1 - x0)))
  panels = [cv2.resize(p, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
            for p in panels]
  if point is not None:  # After upscaling, so the dot keeps its size.
    px, py = (int(round((v - o + 0.5) * scale)) for v, o in zip(point, (x0, y0)))
    for panel in panels[1:]:
      cv2.circle(panel, (px, py), 5, (0, 0, 0), -1, cv2.LINE_AA)
      cv2.circle(panel, (px, py), 4, POINT_COLOUR, -1, cv2.LINE_AA)
  gap = _band(panels[0].shape[0], GAP)
  row = [panels[0]]
  for p in panels[1:]:
    row += [gap, p]
  out = np.concatenate(row, axis=1)
  bands = []
  if legend or caption:
    bands.append(_legend_band(out.shape[1], legend or (), caption))
  if titles is not None:
    if len(titles) != len(panels):
      raise ValueError(f"{len(titles)} titles for {len(panels)} panels")
    bands.append(_title_band(titles, [p.shape[1] for p in panels],
                             [None] + [tuple(int(c) for c in colour) for colour in colours]))
  return np.concatenate(bands + [out], axis=0) if bands else out


def write_overlays(out_dir: Path, *, evaluator, zero_shot_model, fine_tuned_model,
                   eval_prompt: Optional[str] = None,
                   num_objects: int = 6, min_side: int = 256) -> list[Path]:
  """Writes overlays for a fixed set of test objects (the same ones every run).

  Objects are taken round-robin over test images, largest first within an image.
  Each panel title carries the prediction's Dice against the ground-truth object
  mask, both at the original resolution (`object_dice`).

  Args:
    out_dir: Folder of the PNGs (`<image stem>_obj<id>.png`).
    evaluator: A `heldout.Evaluator` (its `images` and `predict`).
    zero_shot_model: The pretrained decoder.
    fine_tuned_model: The fine-tuned decoder.
    eval_prompt: The evaluation prompt of both (`Evaluator.predict`); None: each
      model's own prompt mode.
    num_objects: Objects drawn.
    min_side: Short side of each panel, at least (see `overlay_panels`).

  Returns:
    The PNG paths written.
  """
  chosen = []
  per_image = [sorted(range(len(im.ids)), key=lambda k, im=im: -int((im.labels == im.ids[k]).sum()))
               for im in evaluator.images]
  for depth in range(max((len(p) for p in per_image), default=0)):
    for i, order in enumerate(per_image):
      if depth < len(order) and len(chosen) < num_objects:
        chosen.append((i, order[depth]))
  written = []
  cache = {}
  for i, k in chosen:
    image_info = evaluator.images[i]
    if i not in cache:
      cache[i] = (reading.read_image(image_info.example.image_path),
                  evaluator.predict(zero_shot_model, image_info, eval_prompt),
                  evaluator.predict(fine_tuned_model, image_info, eval_prompt))
    image, zero, tuned = cache[i]
    object_id = int(image_info.ids[k])
    gt = image_info.labels == object_id
    # The prompt drawn is the one used: the interior point for `point`, else the box
    # (`box_corrections`' clicks are not drawn).
    point = box = None
    if eval_prompt == config_lib.POINT_EVAL:
      point = preprocess.interior_points(image_info.labels, image_info.ids[k:k + 1])[0]
    else:
      box = preprocess.boxes_from_labels(image_info.labels, image_info.ids[k:k + 1])[0]
    titles = panel_titles(object_dice(zero[k], gt), object_dice(tuned[k], gt))
    panel = overlay_panels(image, [gt, zero[k], tuned[k]],
                           [GT_COLOUR, ZERO_SHOT_COLOUR, FINE_TUNED_COLOUR], box=box,
                           point=point, min_side=min_side, titles=titles,
                           legend=POINT_LEGEND if point is not None else LEGEND,
                           caption=f"{image_info.example.stem}  object {object_id}")
    path = Path(out_dir) / f"{image_info.example.stem}_obj{object_id}.png"
    ok, encoded = cv2.imencode(".png", panel[..., ::-1])
    assert ok
    fileio.write_bytes(path, encoded.tobytes())
    written.append(path)
  return written


PALETTE = ((30, 120, 255), (255, 80, 80), (60, 200, 60), (255, 200, 0), (200, 80, 255),
           (0, 200, 200))


def draw_prediction(image: np.ndarray, masks: np.ndarray, *, boxes=None, points=None,
                    point_labels=None) -> np.ndarray:
  """The whole image with each mask in its own colour, prompt boxes and points on top."""
  out = image.copy()
  for k, mask in enumerate(masks):
    out = _blend(out, mask, PALETTE[k % len(PALETTE)])
  for box in (boxes if boxes is not None else []):
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    cv2.rectangle(out, (x0, y0), (x1, y1), (255, 255, 255), 1)
  if points is not None:
    for (x, y), label in zip(np.reshape(points, (-1, 2)), np.reshape(point_labels, (-1,))):
      colour = (0, 255, 0) if label == 1 else (255, 0, 0)
      cv2.circle(out, (int(round(x)), int(round(y))), 3, colour, -1)
  return out


def label_colours(count: int) -> np.ndarray:
  """(count + 1, 3) uint8 RGB: black for label 0, then hues a golden ratio apart, so
  neighbouring labels differ."""
  if count == 0:
    return np.zeros((1, 3), np.uint8)
  hues = (np.arange(count) * 0.618034) % 1.0
  hsv = np.stack([hues * 179, np.full(count, 210), np.full(count, 255)], -1)
  rgb = cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0]
  return np.concatenate([np.zeros((1, 3), np.uint8), rgb.reshape(-1, 3)])


def draw_labels(image: np.ndarray, labels: np.ndarray, *, caption: str) -> np.ndarray:
  """The image with each object of a label image tinted in its colour and outlined,
  under a band with `caption` (e.g. the object count)."""
  colours = label_colours(int(labels.max()))
  out = image.astype(np.float32)
  inside = labels > 0
  out[inside] = 0.6 * out[inside] + 0.4 * colours[labels[inside]]
  padded = np.pad(labels, 1, mode="edge")
  edge = inside & ((padded[:-2, 1:-1] != labels) | (padded[2:, 1:-1] != labels)
                   | (padded[1:-1, :-2] != labels) | (padded[1:-1, 2:] != labels))
  out[edge] = colours[labels[edge]]
  band = _legend_band(image.shape[1], [], caption)
  return np.concatenate([band, out.astype(np.uint8)], axis=0)
