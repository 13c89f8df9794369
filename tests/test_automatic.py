"""Automatic segmentation (`tff_sam.evaluation.automatic`): the grid, the filters, NMS
and the label image by hand; the whole generator on the tiny SAM, once with planted
decoder outputs (three known objects) and once with its own random weights; the
`segment` binary on files, and its bad inputs; the `automatic` evaluation prompt
(cached embeddings, scored against hand-computed label images)."""

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf
import tifffile

from tff_sam import config as config_lib
from tff_sam.data import preprocess
from tff_sam.data import reading
from tff_sam.evaluation import automatic
from tff_sam.models import sam as sam_lib


def test_point_grid_centres_points_in_equal_cells():
  np.testing.assert_allclose(automatic.point_grid(2),
                             [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
  assert automatic.point_grid(32).shape == (1024, 2)


def test_crop_boxes_cover_the_image_with_overlap():
  crops = automatic.crop_boxes((100, 150), n_layers=1, overlap_ratio=0.2)
  assert crops[0] == ((0, 0, 150, 100), 0) and len(crops) == 5
  layer = [c for c, i in crops if i == 1]
  cover = np.zeros((100, 150), int)
  for x0, y0, x1, y1 in layer:
    cover[y0:y1, x0:x1] += 1
  assert cover.min() == 1 and cover.max() == 4  # All covered; the middle by all four.


def test_stability_score_by_hand():
  logits = np.full((2, 4, 4), -5.0, np.float32)
  logits[0, :2, :2] = 5.0  # Sharp: the same mask at -1 and +1.
  logits[1, :2, :2] = 0.5  # Soft: 4 pixels above -1, none above +1 ...
  logits[1, 0, 0] = 2.0    # ... but one.
  np.testing.assert_allclose(
      automatic.stability_score(logits, threshold=0.0, offset=1.0), [1.0, 0.25])


def test_box_nms_drops_the_lower_scored_overlapping_box():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], np.float32)
  keep = automatic.box_nms(boxes, np.array([0.5, 0.9, 0.1]), threshold=0.7)
  assert sorted(keep.tolist()) == [1, 2]
  assert automatic.box_nms(np.zeros((0, 4)), np.zeros((0,)), threshold=0.7).size == 0


def test_near_crop_edge_ignores_edges_of_the_image():
  boxes = np.array([[0, 10, 20, 20], [40, 10, 49, 20], [30, 30, 35, 35]], np.float32)
  # Crop (0, 0)-(50, 50) of a 100x100 image: x=49 is the crop's edge, x=0 the image's.
  assert automatic.near_crop_edge(boxes, (0, 0, 50, 50), (100, 100), atol=2).tolist() == [
      False, True, False]


def test_remove_small_regions_fills_holes_and_drops_islands():
  mask = np.zeros((20, 20), bool)
  mask[2:12, 2:12] = True
  mask[5, 5] = False        # A hole of 1 pixel.
  mask[16:18, 16:18] = True  # An island of 4.
  out = automatic.remove_small_regions(mask, 5)
  assert out[5, 5] and not out[16:18, 16:18].any() and out[2:12, 2:12].all()
  only_small = np.zeros((20, 20), bool)
  only_small[1:3, 1:3] = True
  assert automatic.remove_small_regions(only_small, 5).sum() == 4  # Not emptied.


def test_label_image_paints_large_first_and_renumbers():
  masks = np.zeros((3, 9, 11), bool)
  masks[0, 2:4, 2:4] = True  # Small, on top of the large one.
  masks[1, :, :6] = True     # Large.
  masks[2, 2:4, 2:4] = True  # Exactly under the small one, painted before it: vanishes.
  found = automatic.Proposals(masks, automatic.mask_boxes(masks), np.ones(3), np.ones(3),
                              np.zeros((3, 2)), np.zeros((3, 4), np.int64))
  labels = automatic.label_image(found, (9, 11))
  assert labels.dtype == np.uint16 and labels.shape == (9, 11)
  assert sorted(np.unique(labels).tolist()) == [0, 1, 2]
  assert (labels[2:4, 2:4] == 2).all() and labels[0, 0] == 1 and labels[0, 10] == 0


def test_settings_name_the_flag_they_refuse():
  with pytest.raises(Exception) as e:
    config_lib.AutomaticSettings(pred_iou_thresh=1.5).validate()
  assert e.value.flag == "pred_iou_thresh" and "[0, 1]" in str(e.value)
  assert config_lib.AutomaticSettings().validate().points_per_side == 32


# Three planted discs (centre x, y, radius) in a 70 x 90 image.
OBJECTS = ((20, 20, 8), (60, 45, 12), (30, 55, 6))


def _planted_forward(bundle, size):
  """A decoder stand-in: a point inside planted disc k gives that disc's mask (sharp
  logits, predicted IoU 0.95); a point elsewhere a faint blob with IoU 0.3."""
  side, low = sam_lib.image_size(bundle.config), sam_lib.low_res_size(bundle.config)
  yy, xx = np.mgrid[:low, :low] + 0.5
  scale = low / side

  def disc(cx, cy, r):
    (cx, cy), = preprocess.to_input_frame(np.array([[cx, cy]], np.float32), size, side) * scale
    r = r * preprocess.resized_shape(size, side)[0] / size[0] * scale
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r

  discs = [disc(*o) for o in OBJECTS]

  def forward(x):
    points = np.asarray(x["points"])[0, :, 0] * scale
    masks, iou = [], []
    for px, py in points:
      hit = [d for d in discs if d[min(int(py), low - 1), min(int(px), low - 1)]]
      masks.append(np.where(hit[0], 100.0, -100.0) if hit else np.full((low, low), 0.2))
      iou.append(0.95 if hit else 0.3)
    return {"masks": tf.constant(np.array(masks, np.float32)[None]),
            "iou": tf.constant(np.array(iou, np.float32)[None])}
  return forward


def _image(size=(70, 90)):
  rng = np.random.default_rng(0)
  return rng.integers(0, 255, (*size, 3), dtype=np.uint8)


def test_generator_finds_each_planted_object_once(bundle):
  """Many grid points fall in each disc: NMS keeps one mask per disc; points in the
  background are filtered by their predicted IoU; crops find the same objects."""
  image = _image()
  for layers in (0, 1):
    generator = automatic.AutomaticMaskGenerator(
        bundle, settings=config_lib.AutomaticSettings(
            points_per_side=16, points_per_batch=32, crop_n_layers=layers))
    generator._forward = _planted_forward(bundle, image.shape[:2])  # pylint: disable=protected-access
    if layers:  # Crops are encoded apart, but planted outputs are in the whole frame.
      generator._crop_proposals = _whole_frame_only(generator)  # pylint: disable=protected-access
    found = generator(image)
    assert len(found.iou) == len(OBJECTS) and (found.iou == 0.95).all(), layers
    labels = automatic.label_image(found, image.shape[:2])
    assert labels.max() == len(OBJECTS), layers
    for cx, cy, r in OBJECTS:
      truth = (np.mgrid[:70, :90][1] + 0.5 - cx) ** 2 + (np.mgrid[:70, :90][0] + 0.5 - cy) ** 2 <= r * r
      inside = labels[truth]
      assert np.bincount(inside).argmax() > 0 and (inside > 0).mean() > 0.8, (layers, cx, cy)


def _whole_frame_only(generator):
  original = generator._crop_proposals  # pylint: disable=protected-access

  def crop_proposals(image, crop, layer):
    found = original(image, (0, 0, image.shape[1], image.shape[0]), 0)
    return found if layer == 0 else found.take(np.zeros(len(found.iou), bool))
  return crop_proposals


@pytest.mark.parametrize("size", [(37, 53), (64, 64)])
def test_tiny_model_label_image_has_the_input_size(bundle, size):
  """The tiny SAM's own (random) outputs, thresholds at 0: whatever it finds, the label
  image is the image's size (odd sizes too) and every label is one kept mask."""
  generator = automatic.AutomaticMaskGenerator(
      bundle, settings=config_lib.AutomaticSettings(
          points_per_side=4, points_per_batch=8, pred_iou_thresh=0.0,
          stability_score_thresh=0.0, crop_n_layers=1, max_mask_fraction=1.0))
  found = generator(_image(size))
  assert found.masks.shape[1:] == size and len(found.points) == len(found.iou)
  labels = automatic.label_image(found, size)
  assert labels.shape == size and labels.max() <= len(found.iou)


def test_segment_binary_writes_labels_and_overlays(tmp_path, run_binary):
  """Two images of a folder (one with an odd size); its line per image; a second
  command on an image that is not one is one line naming it."""
  folder = tmp_path / "in"
  folder.mkdir()
  cv2.imwrite(str(folder / "a.png"), _image((41, 57)))
  tifffile.imwrite(folder / "b.tif", _image((64, 48)))
  out = tmp_path / "out"
  done = run_binary("segment", "--model=tiny", f"--input={folder}", f"--output_dir={out}",
                 "--points_per_side=4", "--pred_iou_thresh=0", "--stability_score_thresh=0",
                 "--max_mask_fraction=1")
  assert done.code == 0, done.stderr[-2000:]
  for stem, size in (("a", (41, 57)), ("b", (64, 48))):
    labels = cv2.imread(str(out / f"{stem}_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint16 and labels.shape == size
    overlay = cv2.imread(str(out / f"{stem}_overlay.png"))
    assert overlay.shape[1] == size[1] and overlay.shape[0] > size[0]
  lines = [line for line in done.stdout.splitlines() if " objects, " in line]
  assert [line.split(":")[0] for line in lines[:2]] == ["a.png", "b.tif"]
  assert lines[-1].startswith("segmented 2 image(s), ")
  (folder / "c.png").write_bytes(b"not an image")
  bad = run_binary("segment", "--model=tiny", f"--input={folder / 'c.png'}",
                f"--output_dir={tmp_path / 'out2'}")
  assert bad.code == 1 and len(bad.error_lines()) == 1 and "c.png" in bad.error_lines()[0]
  assert "Traceback" not in bad.stderr


def test_from_embedding_equals_the_whole_image_run(bundle):
  """The evaluation's path (a cached embedding) finds what `segment`'s does without crops."""
  image = _image((50, 66))
  generator = automatic.AutomaticMaskGenerator(
      bundle, settings=config_lib.AutomaticSettings(
          points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
          max_mask_fraction=1.0))
  direct = generator(image)
  feats = bundle.processor(images=image, return_tensors="np",
                           input_data_format=preprocess.CHANNELS_LAST)
  embedding = bundle.encoder_fn()(tf.constant(feats["pixel_values"].astype(np.float32)))
  cached = generator.from_embedding(embedding.numpy()[0], original_size=(50, 66),
                                    reshaped_size=tuple(feats["reshaped_input_sizes"][0]))
  assert len(direct.iou) == len(cached.iou) > 0
  np.testing.assert_array_equal(direct.masks, cached.masks)


def test_automatic_evaluation_scores_label_images_by_hand(reference_data, reference_cache,
                                                          monkeypatch):
  """`evaluate --eval_prompt=automatic`: mSA/SA50/SA75 of the label image against every
  true object, and objects found / true, per client; no Dice. Planted label images:
  the truth itself (SA 1) and the truth with half its objects erased."""
  from tff_sam.evaluation import heldout  # pylint: disable=import-outside-toplevel
  settings = config_lib.AutomaticSettings(points_per_side=2)
  real = heldout.evaluate_folder(model="tiny", data_dir=str(reference_data),
                                 cache_dir=str(reference_cache), max_objects_per_image=1,
                                 eval_prompts=("box", "automatic"), automatic_settings=settings)
  auto = real["results"]["automatic"]
  assert np.isnan(auto["dice"]) and 0 <= auto["msa"] <= 1 and auto["objects_found"] >= 0
  assert auto["num_objects"] > real["results"]["box"]["num_objects"]  # Every object counts.
  assert set(auto["by_client"]) == {"site_0", "site_1", "site_2"}
  assert sum(c["objects_found"] for c in auto["by_client"].values()) == auto["objects_found"]

  def halved(unused_self, unused_model, image):
    ids = np.unique(image.labels[image.labels > 0])
    return np.where(np.isin(image.labels, ids[: (len(ids) + 1) // 2]), image.labels, 0)

  for segment, expected in ((lambda unused_self, unused_model, image: image.labels, 1.0),
                            (halved, None)):
    monkeypatch.setattr(heldout.Evaluator, "segment", segment)
    result = heldout.evaluate_folder(model="tiny", data_dir=str(reference_data),
                                     cache_dir=str(reference_cache),
                                     eval_prompts=("automatic",))["results"]["automatic"]
    if expected is not None:
      assert result["msa"] == result["sa50"] == 1.0
      assert result["objects_found"] == result["num_objects"]
    else:  # TP = kept, FN = erased, FP = 0 at every threshold: SA = kept / all.
      counts = [len(reading.object_ids(reading.read_mask(m)))
                for m in sorted((Path(reference_data) / "test").glob("*/masks/*"))]
      expected = np.mean([((n + 1) // 2) / n for n in counts])
      assert result["objects_found"] == sum((n + 1) // 2 for n in counts)
      assert result["sa50"] == pytest.approx(expected) and result["msa"] == pytest.approx(expected)
  monkeypatch.undo()
  strict = heldout.evaluate_folder(
      model="tiny", data_dir=str(reference_data), cache_dir=str(reference_cache),
      eval_prompts=("automatic",), automatic_settings=dataclasses.replace(
          settings, pred_iou_thresh=1.0))["results"]["automatic"]
  assert strict["objects_found"] == 0 and "--pred_iou_thresh=1" in strict["hint"]
  assert "; hint: no mask passed" in heldout.EvalResult(**strict).scores_line()
  assert ("hint" in auto) == (auto["objects_found"] == 0)  # A hint only when none passed.


def test_no_mask_passing_gives_a_hint_naming_the_filter(bundle):
  """Planted outputs with predicted IoU 0.95 in the discs and 0.3 elsewhere: at
  --pred_iou_thresh=0.97 nothing passes, and the hint names the flag, the highest
  predicted IoU and a threshold the masks pass; with the discs unstable (soft logits)
  it names the stability threshold instead; when objects are found there is none."""
  image = _image()
  settings = config_lib.AutomaticSettings(points_per_side=16, points_per_batch=32,
                                          pred_iou_thresh=0.97)
  generator = automatic.AutomaticMaskGenerator(bundle, settings=settings)
  generator._forward = _planted_forward(bundle, image.shape[:2])  # pylint: disable=protected-access
  assert len(generator(image).iou) == 0
  hint = generator.tally.hint(settings)
  assert "--pred_iou_thresh=0.97" in hint and "up to 0.95" in hint, hint
  suggested = float(hint.split("Try --pred_iou_thresh=")[1].split()[0])
  assert 0.3 <= suggested <= 0.95  # The discs (a quarter of the grid or less) may pass.
  assert generator.tally.prompts == 256 and generator.tally.passed_iou == 0

  loose = dataclasses.replace(settings, pred_iou_thresh=0.9)
  soft = automatic.AutomaticMaskGenerator(bundle, settings=loose)
  planted = _planted_forward(bundle, image.shape[:2])
  soft._forward = lambda x: {**planted(x), "masks": planted(x)["masks"] / 100.0}  # pylint: disable=protected-access
  assert len(soft(image).iou) == 0
  soft_hint = soft.tally.hint(loose)
  assert "none --stability_score_thresh=0.95" in soft_hint and "reach" in soft_hint, soft_hint
  stability = float(soft_hint.split("Try --stability_score_thresh=")[1])
  assert 0.0 <= stability < 0.95

  found = automatic.AutomaticMaskGenerator(bundle, settings=loose)
  found._forward = planted  # pylint: disable=protected-access
  assert len(found(image).iou) == len(OBJECTS) and found.tally.hint(loose) == ""


def test_run_takes_automatic_settings_only_with_automatic_evaluation():
  """`run --pred_iou_thresh` without `automatic` in --eval_prompt is one error naming
  it; with it, the run's evaluator gets the settings."""
  with pytest.raises(Exception) as e:
    config_lib.RunConfig(output_dir="x", pred_iou_thresh=0.7).validate()
  assert e.value.flag == "pred_iou_thresh" and "automatic" in str(e.value)
  config = config_lib.RunConfig(output_dir="x", eval_prompt=("point", "automatic"),
                                pred_iou_thresh=0.7, points_per_side=8).validate()
  assert config.automatic_settings == config_lib.AutomaticSettings(pred_iou_thresh=0.7,
                                                                   points_per_side=8)
  with pytest.raises(Exception) as e:
    dataclasses.replace(config, stability_score_thresh=2.0).validate()
  assert e.value.flag == "stability_score_thresh"
