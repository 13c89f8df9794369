"""Segmentation of users' images with a (fine-tuned) SAM: masks at the original resolution.

`masks_at_original_size` turns prompts in SAM's input frame into boolean masks of the
original image size (SAM's `post_process_masks`); evaluation and `Predictor` share it.
`Predictor` takes an image and prompts in original pixel coordinates, as users give
them (`predict_paths`: `python -m tff_sam.experiments.predict`); `segment_paths`
segments images without prompts (`automatic`; `python -m tff_sam.experiments.segment`).
"""

from pathlib import Path
import time
from typing import Callable, Optional

import cv2
import numpy as np
import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam import fileio
from tff_sam import output_folder
from tff_sam import terminal
from tff_sam.data import discovery
from tff_sam.data import preprocess
from tff_sam.data import reading
from tff_sam.evaluation import automatic
from tff_sam.evaluation import plots
from tff_sam.models import build
from tff_sam.models import sam as sam_lib


def masks_at_original_size(forward: Callable[[dict], tf.Tensor], processor, *,
                           embedding: np.ndarray, boxes: np.ndarray, points: np.ndarray,
                           point_labels: np.ndarray, original_size: tuple[int, int],
                           reshaped_size: tuple[int, int], chunk: int = 16,
                           mask_inputs: Optional[np.ndarray] = None,
                           return_logits: bool = False):
  """Decodes K prompts on one image embedding into K boolean masks (K, H, W).

  Args:
    forward: Model call returning mask logits (1, P, L, L) for inputs of batch 1.
    processor: The `SamImageProcessor` (for `post_process_masks`).
    embedding: (C, s, s) image embedding.
    boxes: (K, 4) XYXY boxes in the input frame (ignored by point-only models).
    points: (K, N, 2) points in the input frame (ignored by box-only models).
    point_labels: (K, N) 1 positive, 0 negative, -1 padding.
    original_size: (H, W) of the original image.
    reshaped_size: (h, w) of the resized image inside the input frame.
    chunk: Prompts per decoder call (fixed, so the call is traced once).
    mask_inputs: Optional (K, L, L) low-resolution logits of a previous prediction,
      given to the model as SAM's mask prompt (`PromptMaskDecoder`'s `mask_inputs`).
    return_logits: Also return the (K, L, L) low-resolution logits.

  Returns:
    Boolean masks, one per prompt (and the logits with `return_logits`).
  """
  k = len(boxes)
  out, low = [], []
  for start in range(0, k, chunk):
    n = min(chunk, k - start)
    b = np.zeros((chunk, 4), np.float32)
    p = np.zeros((chunk,) + points.shape[1:], np.float32)
    lab = np.full((chunk,) + point_labels.shape[1:], -1, np.int32)
    b[:n], p[:n], lab[:n] = boxes[start:start + n], points[start:start + n], point_labels[start:start + n]
    x = {"image_embeddings": embedding[None].astype(np.float32), "boxes": b[None],
         "points": p[None], "point_labels": lab[None]}
    if mask_inputs is not None:
      m = np.zeros((chunk,) + mask_inputs.shape[1:], np.float32)
      m[:n] = mask_inputs[start:start + n]
      x["mask_inputs"] = m[None]
    logits = forward(x)[0, :n]
    masks = processor.post_process_masks(
        [logits[:, None]], [original_size], [reshaped_size], return_tensors="tf")[0]
    out.append(masks[:, 0].numpy())
    low.append(np.asarray(logits))
  if not out:
    masks = np.zeros((0,) + tuple(original_size), bool)
    return (masks, np.zeros((0, 1, 1), np.float32)) if return_logits else masks
  masks = np.concatenate(out, axis=0)
  return (masks, np.concatenate(low, axis=0)) if return_logits else masks


def correction_clicks(predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """One corrective click per object where its prediction is most wrong (micro-sam's rule).

  The click goes to the pixel farthest from the boundary of the largest connected
  error region (predicted XOR true): positive (1) if that region is missed object,
  negative (0) if it is wrongly predicted background. An object predicted exactly
  gets no click (label -10, transformers' padding: no token).

  Args:
    predicted: (K, H, W) bool predicted masks.
    truth: (K, H, W) bool true masks of the same objects.

  Returns:
    points (K, 2) float32 XY in original pixels, labels (K,) int32.
  """
  k = len(predicted)
  points, labels = np.zeros((k, 2), np.float32), np.full((k,), -10, np.int32)
  for i in range(k):
    error = np.logical_xor(predicted[i], truth[i]).astype(np.uint8)
    if not error.any():
      continue
    count, components, stats, _ = cv2.connectedComponentsWithStats(error, connectivity=8)
    largest = 1 + int(np.argmax(stats[1:count, cv2.CC_STAT_AREA]))
    region = np.pad((components == largest).astype(np.uint8), 1)
    dist = cv2.distanceTransform(region, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    points[i] = (x, y)
    labels[i] = 1 if truth[i][y, x] else 0
  return points, labels


class Predictor:
  """Segments objects in images from box and/or point prompts."""

  def __init__(self, bundle: sam_lib.SamBundle, *, prompt: str):
    """Builds the model for one prompt mode (`box`, `points` or `both`)."""
    self.bundle = bundle
    self.prompt = prompt
    self._model = build.build_prompt_mask_decoder(bundle, prompt=prompt)
    self._forward = tf.function(lambda x: self._model(x, training=False)["masks"],
                                reduce_retracing=True)  # Any number of prompts.
    self._encode = bundle.encoder_fn()
    self.input_size = sam_lib.image_size(bundle.config)

  def __call__(self, image: np.ndarray, *, boxes: Optional[np.ndarray] = None,
               points: Optional[np.ndarray] = None,
               point_labels: Optional[np.ndarray] = None) -> np.ndarray:
    """Masks (K, H, W) for K prompts given in original pixel coordinates.

    Args:
      image: (H, W, 3) uint8.
      boxes: (K, 4) XYXY boxes, one object each.
      points: (K, N, 2) XY points per object.
      point_labels: (K, N) 1 positive / 0 negative.

    Raises:
      errors.UserError: A prompt outside the image.
    """
    h, w = image.shape[:2]
    k = len(boxes) if boxes is not None else len(points)
    for name, arr in (("box", boxes), ("point", points)):
      if arr is None:
        continue
      xy = np.asarray(arr, np.float64).reshape(-1, 2)
      # SAM's coordinates run over the pixels' edges: 0..w, 0..h (a box may end there).
      bad = (xy[:, 0] < 0) | (xy[:, 0] > w) | (xy[:, 1] < 0) | (xy[:, 1] > h)
      if bad.any():
        x, y = xy[np.argmax(bad)]
        raise errors.ConfigError(name, f"coordinate ({x:g}, {y:g}) is outside the "
                                 f"{w}x{h} image (0..{w}, 0..{h})")
    feats = self.bundle.processor(images=image, return_tensors="np",
                                  input_data_format=preprocess.CHANNELS_LAST)
    embedding = self._encode(tf.constant(feats["pixel_values"].astype(np.float32))).numpy()[0]
    size = (h, w)
    in_boxes = (preprocess.to_input_frame(np.asarray(boxes, np.float32).reshape(-1, 2, 2), size,
                                          self.input_size).reshape(-1, 4)
                if boxes is not None else np.zeros((k, 4), np.float32))
    if points is not None:
      in_points = preprocess.to_input_frame(np.asarray(points, np.float32), size, self.input_size)
      labels = np.asarray(point_labels, np.int32)
    else:
      in_points, labels = np.zeros((k, 1, 2), np.float32), -np.ones((k, 1), np.int32)
    return masks_at_original_size(
        self._forward, self.bundle.processor, embedding=embedding, boxes=in_boxes,
        points=in_points, point_labels=labels, original_size=size,
        reshaped_size=tuple(int(v) for v in feats["reshaped_input_sizes"][0]))


def _prompt_arrays(boxes, points):
  """Validates prompt lists; returns (mode, boxes (K,4)|None, points (K,N,2)|None, labels)."""
  if not boxes and not points:
    raise errors.ConfigError("box", "give at least one --box or --point")
  if points and len(boxes) > 1:
    raise errors.ConfigError(
        "point", "points refine one object: use them alone or with exactly one --box")
  box_arr = np.asarray(boxes, np.float32).reshape(-1, 4) if boxes else None
  for b in box_arr if box_arr is not None else []:
    if b[2] < b[0] or b[3] < b[1]:
      raise errors.ConfigError("box", f"{','.join(f'{v:g}' for v in b)} must be x0,y0,x1,y1 "
                               "with x0 <= x1 and y0 <= y1")
  if not points:
    return config_lib.BOX_PROMPT, box_arr, None, None
  pts = np.asarray([p[:2] for p in points], np.float32)[None]
  labels = np.asarray([int(p[2]) if len(p) > 2 else 1 for p in points], np.int32)[None]
  if not np.isin(labels, (0, 1)).all():
    raise errors.ConfigError("point", "labels must be 1 (object) or 0 (background)")
  mode = config_lib.BOTH_PROMPTS if boxes else config_lib.POINTS_PROMPT
  return mode, box_arr, pts, labels


def predict_paths(*, model: str, image: str, boxes, points, output: str,
                  mask_out: Optional[str] = None, cache_dir: Optional[str] = None) -> list:
  """What `python -m tff_sam.experiments.predict` does; returns the files written.

  Args:
    model: Model name or directory (see `tff_sam.models.build.load_sam`).
    image: An image file, or a folder of images (each gets the same prompts).
    boxes: List of [x0, y0, x1, y1] in image pixels, one object each.
    points: List of [x, y] or [x, y, label]; together they prompt one object.
    output: Overlay PNG path (a folder for a folder of images).
    mask_out: Optional label PNG path (a folder for a folder of images).
    cache_dir: Cache root.

  Raises:
    errors.UserError: Bad prompts, files or model (one line).
  """
  mode, box_arr, pts, labels = _prompt_arrays(boxes, points)
  source = Path(image).expanduser()
  if source.is_dir():
    images = sorted(p for p in source.iterdir()
                    if p.is_file() and p.suffix.lower() in discovery.IMAGE_SUFFIXES)
    if not images:
      raise errors.DataError(source, "no images found")
    overlay_paths = [Path(output) / f"{p.stem}.png" for p in images]
    mask_paths = [Path(mask_out) / f"{p.stem}.png" for p in images] if mask_out else None
  elif source.is_file():
    images, overlay_paths = [source], [Path(output)]
    mask_paths = [Path(mask_out)] if mask_out else None
  else:
    raise errors.DataError(source, "image not found")
  cache = Path(cache_dir).expanduser() if cache_dir else None
  predictor = Predictor(build.load_sam(model, cache_dir=cache), prompt=mode)
  written = []
  for i, path in enumerate(images):
    img = reading.read_image(path)
    preprocess.require_resizable(path, img.shape[:2], predictor.input_size)
    masks = predictor(img, boxes=box_arr, points=pts, point_labels=labels)
    drawn = plots.draw_prediction(img, masks, boxes=box_arr, points=pts, point_labels=labels)
    ok, png = cv2.imencode(".png", drawn[..., ::-1])
    assert ok
    fileio.write_bytes(overlay_paths[i], png.tobytes())
    written.append(overlay_paths[i])
    if mask_paths:
      label_image = np.zeros(img.shape[:2], np.uint16)
      for k, mask in enumerate(masks, start=1):
        label_image[mask] = k
      ok, png = cv2.imencode(".png", label_image)
      assert ok
      fileio.write_bytes(mask_paths[i], png.tobytes())
      written.append(mask_paths[i])
  return written


def image_files(source: Path) -> list[Path]:
  """The image file `source`, or the images of the folder `source` (sorted).

  Raises:
    errors.DataError: It does not exist, the folder has no image, or two of its
      images share a stem (their outputs would overwrite each other).
  """
  source = Path(source).expanduser()
  if source.is_file():
    return [source]
  if not source.is_dir():
    raise errors.DataError(source, "image or folder not found")
  images = sorted(p for p in source.iterdir()
                  if p.is_file() and p.suffix.lower() in discovery.IMAGE_SUFFIXES)
  if not images:
    raise errors.DataError(source, "no images found (" + ", ".join(discovery.IMAGE_SUFFIXES)
                           + ")")
  stems = {}
  for path in images:
    if path.stem in stems:
      raise errors.DataError(path, f"has the stem of {stems[path.stem].name}: their outputs "
                             "would overwrite each other; rename one")
    stems[path.stem] = path
  return images


def segment_paths(*, model: str, source: str, output_dir: str,
                  settings: Optional[config_lib.AutomaticSettings] = None,
                  cache_dir: Optional[str] = None,
                  log: Callable[[str], None] = print) -> list[dict]:
  """What `python -m tff_sam.experiments.segment` does: automatic segmentation of an
  image or a folder of images into `output_dir`.

  Writes, per image, `<stem>_labels.png` (uint16 instance labels of the image's size)
  and `<stem>_overlay.png` (objects tinted and outlined, the count above), and logs a
  line with its object count and seconds (a progress bar on stderr for folders).

  Returns:
    Per image: {"image", "objects", "seconds", "labels", "overlay"}.

  Raises:
    errors.UserError: Bad model, image, folder or output folder (one line).
  """
  images = image_files(Path(source))
  cache = Path(cache_dir).expanduser() if cache_dir else None
  bundle = build.load_sam(model, cache_dir=cache)
  generator = automatic.AutomaticMaskGenerator(bundle, settings=settings)
  done = []
  with output_folder.claim(output_dir) as out:
    bar = terminal.progress_bar(images, desc="segmenting", unit="img", disable=len(images) == 1)
    for path in bar:
      start = time.monotonic()
      image = reading.read_image(path)
      preprocess.require_resizable(path, image.shape[:2], generator.input_size)
      labels = automatic.label_image(generator(image), image.shape[:2])
      count = int(labels.max())
      files = {"labels": out / f"{path.stem}_labels.png",
               "overlay": out / f"{path.stem}_overlay.png"}
      _write_png(files["labels"], labels)
      _write_png(files["overlay"], plots.draw_labels(
          image, labels, caption=f"{path.name}: {count} objects (automatic, {model})")[..., ::-1])
      done.append({"image": str(path), "objects": count,
                   "seconds": time.monotonic() - start, **{k: str(v) for k, v in files.items()}})
      with bar.external_write_mode():
        log(f"{path.name}: {count} objects, {done[-1]['seconds']:.1f} s -> {files['labels']}")
  hint = generator.tally.hint(generator.settings)
  if hint:
    log(f"hint: {hint}")
  return done


def _write_png(path: Path, array: np.ndarray) -> None:
  """Writes a PNG atomically (uint8 RGB/BGR as given, or uint16 gray)."""
  ok, png = cv2.imencode(".png", array)
  if not ok:
    raise errors.DataError(path, "could not be encoded as PNG")
  fileio.write_bytes(path, png.tobytes())
