"""Pictures of a run: the metrics curve and prediction overlays.

* `plot_metrics`: `metrics.png`, training loss and held-out Dice per round, with the
  zero-shot Dice as a dashed line.
* `write_overlays`: one PNG per selected test object, four panels side by side:
  image, ground truth, zero-shot prediction, fine-tuned prediction (crops around the
  object, masks drawn in colour with their outline, prompt box in white).
"""

import csv
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from matplotlib.figure import Figure

from tff_sam import fileio
from tff_sam.data import preprocess
from tff_sam.data import reading

GT_COLOUR = (0, 200, 0)
ZERO_SHOT_COLOUR = (230, 140, 0)
FINE_TUNED_COLOUR = (30, 120, 255)


def plot_metrics(metrics_csv: Path, out_png: Path) -> Path:
  """Draws training loss and test Dice per round from `metrics.csv`."""
  with open(metrics_csv) as f:
    rows = list(csv.DictReader(f))
  loss = [(int(r["round"]), float(r["train_loss"])) for r in rows if r.get("train_loss")]
  dice = [(int(r["round"]), float(r["test_dice"])) for r in rows if r.get("test_dice")]
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
    ax2.legend(loc="lower right")
  ax2.set(title="held-out Dice (original resolution)", xlabel="round", ylabel="Dice")
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  with fileio.atomic_path(out_png, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=100, format="png")
  return Path(out_png)


def _blend(image: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
  out = image.astype(np.float32)
  out[mask] = 0.55 * out[mask] + 0.45 * np.asarray(colour, np.float32)
  out = out.astype(np.uint8)
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
  cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 1)
  return out


def overlay_panels(image: np.ndarray, masks: Sequence[np.ndarray], colours,
                   box=None, margin: int = 24, min_side: int = 160) -> np.ndarray:
  """Side-by-side crops: the image, then the image with each mask overlaid."""
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
      cv2.rectangle(panel, (bx0 - x0, by0 - y0), (bx1 - x0, by1 - y0), (255, 255, 255), 1)
    panels.append(panel)
  scale = max(1.0, min_side / max(1, min(y1 - y0, x1 - x0)))
  panels = [cv2.resize(p, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
            for p in panels]
  gap = np.full((panels[0].shape[0], 4, 3), 255, np.uint8)
  row = [panels[0]]
  for p in panels[1:]:
    row += [gap, p]
  return np.concatenate(row, axis=1)


def write_overlays(out_dir: Path, *, evaluator, zero_shot_model, fine_tuned_model,
                   num_objects: int = 6) -> list[Path]:
  """Writes overlays for a fixed set of test objects (the same ones every run).

  Objects are taken round-robin over test images, largest first within an image.

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
                  evaluator.predict(zero_shot_model, image_info),
                  evaluator.predict(fine_tuned_model, image_info))
    image, zero, tuned = cache[i]
    gt = image_info.labels == image_info.ids[k]
    box = preprocess.boxes_from_labels(image_info.labels, image_info.ids[k:k + 1])[0]
    panel = overlay_panels(image, [gt, zero[k], tuned[k]],
                           [GT_COLOUR, ZERO_SHOT_COLOUR, FINE_TUNED_COLOUR], box=box)
    path = Path(out_dir) / f"{image_info.example.stem}_obj{int(image_info.ids[k])}.png"
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
