"""Tests for tff_sam.data.preprocess (SAM preprocessing parity) and tff_sam.data.prompts."""

import numpy as np
import pytest
import tensorflow as tf
from transformers import SamConfig, SamImageProcessor
from transformers.models.sam.image_processing_sam import _normalize_coordinates

from tff_sam.data import preprocess
from tff_sam.data import prompts
from tff_sam.models import sam as sam_lib

# Frames of the prompt-sampling tests (any sizes work; prompts does not use a model).
INPUT, LOW = 128, 32

# Frames of the tiny model's processor, for the preprocessing tests.
_TINY = sam_lib.tiny_sam_config()
P_INPUT, P_LOW = sam_lib.image_size(_TINY), sam_lib.low_res_size(_TINY)


@pytest.fixture(name="processor", scope="module")
def _processor():
  return sam_lib.build_image_processor(_TINY)


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3)).astype(np.uint8)


def _labels(h, w, seed=0, max_label=5):
  rng = np.random.default_rng(seed)
  labels = np.zeros((h, w), np.int32)
  for k in range(1, max_label + 1):
    y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
    labels[y:y + rng.integers(1, max(2, h // 2)), x:x + rng.integers(1, max(2, w // 2))] = k
  return labels


# ----------------------------------------------------------------------------- preprocess


@pytest.mark.parametrize("hw", [(37, 53), (90, 40), (64, 64), (200, 300)])
def test_pixel_values_equal_sam_image_processor(processor, hw):
  image, labels = _image(*hw), _labels(*hw)
  # An independently configured processor with SAM's rules at the tiny model's sizes.
  reference = SamImageProcessor(
      size={"longest_edge": P_INPUT}, pad_size={"height": P_INPUT, "width": P_INPUT},
      mask_size={"longest_edge": P_LOW}, mask_pad_size={"height": P_LOW, "width": P_LOW})
  expected = reference(images=image, return_tensors="np")
  out = preprocess.preprocess(processor, image, labels, input_size=P_INPUT)
  assert out.pixel_values.dtype == np.float32
  assert out.pixel_values.shape == (3, P_INPUT, P_INPUT)
  np.testing.assert_array_equal(out.pixel_values, expected["pixel_values"][0].astype(np.float32))
  assert out.original_size == hw
  assert out.reshaped_size == tuple(expected["reshaped_input_sizes"][0])
  assert out.reshaped_size == preprocess.resized_shape(hw, P_INPUT)
  assert out.input_labels.shape == (P_INPUT, P_INPUT) and out.input_labels.dtype == np.int32


def test_build_image_processor_matches_sam_defaults():
  """At SAM's real size (1024), the built processor is transformers' default one."""
  ours = sam_lib.build_image_processor(SamConfig())
  default = SamImageProcessor()
  for key in ("size", "pad_size", "mask_size", "mask_pad_size", "image_mean", "image_std",
              "rescale_factor", "do_normalize", "do_pad", "do_resize", "do_rescale", "resample"):
    assert getattr(ours, key) == getattr(default, key), key
  image = _image(30, 45, seed=3)
  np.testing.assert_array_equal(ours(images=image, return_tensors="np")["pixel_values"],
                                default(images=image, return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("hw", [(37, 53), (90, 40), (64, 64), (7, 300), (257, 129)])
def test_resize_labels_equals_processor_segmentation_maps(processor, hw):
  labels = _labels(*hw, seed=sum(hw), max_label=9)
  image = _image(*hw)
  feats = processor(images=image, segmentation_maps=labels.astype(np.uint8), return_tensors="np")
  expected = feats["labels"][0]
  assert expected.shape == (P_LOW, P_LOW)
  out = preprocess.resize_labels(labels, longest_edge=P_LOW, pad_to=P_LOW)
  h, w = preprocess.resized_shape(hw, P_LOW)
  np.testing.assert_array_equal(out[:h, :w], expected[:h, :w])
  assert (out[h:, :] == preprocess.PAD_LABEL).all()
  assert (out[:, w:] == preprocess.PAD_LABEL).all()
  assert (out[:h, :w] >= 0).all()


@pytest.mark.parametrize("hw", [(37, 53), (90, 40), (7, 300)])
def test_preprocess_input_labels_equal_processor_at_input_size(processor, hw):
  """preprocess() resizes labels to the input frame with the processor's mask rule."""
  labels = _labels(*hw, seed=hw[0], max_label=9)
  image = _image(*hw)
  reference = SamImageProcessor(
      size={"longest_edge": P_INPUT}, pad_size={"height": P_INPUT, "width": P_INPUT},
      mask_size={"longest_edge": P_INPUT}, mask_pad_size={"height": P_INPUT, "width": P_INPUT})
  expected = reference(images=image, segmentation_maps=labels.astype(np.uint8),
                       return_tensors="np")["labels"][0]
  out = preprocess.preprocess(processor, image, labels, input_size=P_INPUT).input_labels
  np.testing.assert_array_equal(
      out, preprocess.resize_labels(labels, longest_edge=P_INPUT, pad_to=P_INPUT))
  h, w = preprocess.resized_shape(hw, P_INPUT)
  np.testing.assert_array_equal(out[:h, :w], expected[:h, :w])
  assert (out[h:] == -1).all() and (out[:, w:] == -1).all()


def test_resize_labels_keeps_labels_above_255(processor):
  hw = (50, 70)
  small = _labels(*hw, seed=11, max_label=6)
  big_values = np.array([0, 300, 1000, 65535, 70000, 256, 2**31 - 1], np.int64)
  big = big_values[small].astype(np.int32)
  out = preprocess.resize_labels(big, longest_edge=P_LOW, pad_to=P_LOW)
  ref = preprocess.resize_labels(small, longest_edge=P_LOW, pad_to=P_LOW)
  h, w = preprocess.resized_shape(hw, P_LOW)
  np.testing.assert_array_equal(out[:h, :w], big_values[ref[:h, :w]])
  assert set(np.unique(out[:h, :w])) <= set(big_values.tolist())


@pytest.mark.parametrize("hw", [(37, 53), (90, 40), (64, 64), (480, 640), (1000, 3)])
@pytest.mark.parametrize("target", [INPUT, 1024])
def test_to_input_frame_equals_transformers(hw, target):
  rng = np.random.default_rng(hw[0])
  h, w = hw
  points = np.stack([rng.uniform(0, w - 1, 7), rng.uniform(0, h - 1, 7)], axis=-1)
  out = preprocess.to_input_frame(points, hw, target)
  assert out.dtype == np.float32 and out.shape == (7, 2)
  np.testing.assert_allclose(out, _normalize_coordinates(target, points, hw), rtol=1e-6)
  boxes = np.concatenate([points[:5], points[2:]], axis=-1)  # (5, 4) XYXY
  out_boxes = preprocess.to_input_frame(boxes.reshape(-1, 2, 2), hw, target).reshape(-1, 4)
  np.testing.assert_allclose(
      out_boxes, _normalize_coordinates(target, boxes, hw, is_bounding_box=True), rtol=1e-6)
  # Batched (..., 2) input works too.
  np.testing.assert_allclose(preprocess.to_input_frame(points[None, None], hw, target)[0, 0],
                             out, rtol=0)


def test_to_input_frame_known_values():
  # 50x100 image, 128 input: scale 1.28 -> resized 64x128.
  out = preprocess.to_input_frame(np.array([[10.0, 20.0], [99.0, 49.0]]), (50, 100), 128)
  np.testing.assert_allclose(out, [[12.8, 25.6], [126.72, 62.72]], rtol=1e-6)


def test_boxes_from_labels_known_rectangles():
  labels = np.zeros((20, 30), np.int32)
  labels[2:5, 3:10] = 4        # rows 2..4, cols 3..9
  labels[10:20, 0:1] = 7       # a 1-px wide column at the image border
  labels[15, 29] = 9           # a single pixel
  labels[0:2, 20:25] = 12
  labels[6:8, 20:22] = 12      # an object in two pieces
  boxes = preprocess.boxes_from_labels(labels, np.array([4, 7, 9, 12]))
  assert boxes.dtype == np.float32 and boxes.shape == (4, 4)
  np.testing.assert_array_equal(boxes, [[3, 2, 9, 4], [0, 10, 0, 19], [29, 15, 29, 15],
                                        [20, 0, 24, 7]])
  np.testing.assert_array_equal(preprocess.boxes_from_labels(labels, np.array([7])),
                                [[0, 10, 0, 19]])
  assert preprocess.boxes_from_labels(labels, np.zeros((0,), np.int32)).shape == (0, 4)


def test_interior_points_inside_object():
  labels = np.zeros((40, 40), np.int32)
  labels[5:16, 5:16] = 1                      # square: centre (10, 10)
  labels[20:38, 2:6] = 2                      # L shape
  labels[34:38, 2:30] = 2
  yy, xx = np.mgrid[0:40, 0:40]
  labels[((yy - 12) ** 2 + (xx - 30) ** 2 <= 36) & ~((yy - 12) ** 2 + (xx - 30) ** 2 <= 9)] = 3
  labels[0, 39] = 4                           # a single pixel at the border
  labels[20:30, 39:40] = 5                    # a line along the border
  ids = np.array([1, 2, 3, 4, 5])
  points = preprocess.interior_points(labels, ids)
  assert points.shape == (5, 2) and points.dtype == np.float32
  for (x, y), i in zip(points.astype(int), ids):
    assert labels[y, x] == i, (i, x, y)
  np.testing.assert_array_equal(points[0], [10, 10])
  np.testing.assert_array_equal(points[3], [39, 0])


# ----------------------------------------------------------------------------- boxes


def _random_boxes(n, seed=0, size=INPUT):
  rng = np.random.default_rng(seed)
  a = rng.uniform(0, size - 1, (n, 2, 2))
  return np.concatenate([a.min(axis=1), a.max(axis=1)], axis=-1).astype(np.float32)


def test_jitter_zero_is_identity():
  boxes = _random_boxes(50)
  out = prompts.jitter_boxes(boxes, max_jitter=0.0, input_size=INPUT, seed=tf.constant([1, 2]))
  np.testing.assert_array_equal(out.numpy(), boxes)


def test_jitter_bounded_ordered_inside_frame():
  boxes = _random_boxes(500, seed=1)
  boxes[:10] = [[0, 0, 2, 2]] * 10              # at the corner: clipping matters
  boxes[10:20] = [[125, 125, 127, 127]] * 10
  boxes[20:30] = [[60, 60, 60, 60]] * 10        # degenerate: jitter may cross
  jitter = 8.0
  out = prompts.jitter_boxes(boxes, max_jitter=jitter, input_size=INPUT,
                             seed=tf.constant([3, 4])).numpy()
  assert out.shape == boxes.shape and out.dtype == np.float32
  assert (np.abs(out - boxes) <= jitter + 1e-4).all()
  assert (out[:, 0] <= out[:, 2]).all() and (out[:, 1] <= out[:, 3]).all()
  assert (out >= 0).all() and (out <= INPUT - 1).all()
  # It does jitter, over (most of) the allowed range, independently per coordinate.
  d = (out - boxes)[30:]
  assert np.abs(d).max() > 0.9 * jitter
  assert (np.abs(d) > 1e-3).mean() > 0.95
  assert abs(np.corrcoef(d[:, 0], d[:, 2])[0, 1]) < 0.2


def test_jitter_unclipped_is_uniform_shift():
  # Far from the border and wide boxes: out - in is exactly the U(-J, J) draw.
  boxes = np.tile(np.array([[40.0, 40.0, 90.0, 90.0]], np.float32), (2000, 1))
  out = prompts.jitter_boxes(boxes, max_jitter=5.0, input_size=INPUT,
                             seed=tf.constant([0, 9])).numpy()
  d = out - boxes
  assert (np.abs(d) <= 5.0).all()
  assert abs(d.mean()) < 0.2 and abs(d.std() - 10 / np.sqrt(12)) < 0.1


def test_jitter_deterministic_per_seed():
  boxes = _random_boxes(20, seed=2)
  def run(seed):
    return prompts.jitter_boxes(boxes, max_jitter=10.0, input_size=INPUT,
                                seed=tf.constant(seed, tf.int64)).numpy()
  np.testing.assert_array_equal(run([5, 6]), run([5, 6]))
  assert not np.allclose(run([5, 6]), run([5, 7]))


def test_jitter_side_fraction_scales_with_box_and_is_capped():
  """SAM-style noise: std = fraction * box side, clipped to +-max_jitter."""
  n = 3000
  small = np.tile(np.array([[50.0, 60.0, 59.0, 79.0]], np.float32), (n, 1))  # w 10, h 20
  out = prompts.jitter_boxes(small, max_jitter=20.0, input_size=INPUT, seed=tf.constant([2, 3]),
                             side_fraction=0.1).numpy()
  d = out - small
  assert (np.abs(d) <= 20.0).all()
  np.testing.assert_allclose(d[:, [0, 2]].std(), 1.0, rtol=0.1)  # 0.1 * 10
  np.testing.assert_allclose(d[:, [1, 3]].std(), 2.0, rtol=0.1)  # 0.1 * 20
  assert abs(d.mean()) < 0.1
  # A big box: std 0.5 * 101 px would be ~50 px; the shift is capped at max_jitter.
  big = np.tile(np.array([[10.0, 10.0, 110.0, 110.0]], np.float32), (n, 1))
  out = prompts.jitter_boxes(big, max_jitter=6.0, input_size=INPUT, seed=tf.constant([2, 4]),
                             side_fraction=0.5).numpy()
  d = out - big
  assert (np.abs(d) <= 6.0 + 1e-4).all()
  assert (np.abs(d) > 5.999).mean() > 0.8  # mostly clipped at the cap
  assert (out[:, 0] <= out[:, 2]).all() and (out[:, 1] <= out[:, 3]).all()
  # Zero max_jitter stays the identity whatever the fraction.
  np.testing.assert_array_equal(
      prompts.jitter_boxes(big, max_jitter=0.0, input_size=INPUT, seed=tf.constant([0, 0]),
                           side_fraction=0.1).numpy(), big)


def test_jitter_batched_shapes():
  boxes = _random_boxes(12, seed=4).reshape(3, 4, 4)
  out = prompts.jitter_boxes(boxes, max_jitter=3.0, input_size=INPUT, seed=tf.constant([1, 1]))
  assert out.shape == (3, 4, 4)


# ----------------------------------------------------------------------------- points


def _np_erode(m):
  p = np.pad(m, 1, constant_values=1)  # the border does not erode (SAME max-pool)
  out = np.ones_like(m)
  for dy in range(3):
    for dx in range(3):
      out &= p[dy:dy + m.shape[0], dx:dx + m.shape[1]]
  return out


def _to_low_res(points, side=LOW, input_size=INPUT):
  scale = input_size / side
  idx = (points - (scale - 1) / 2) / scale
  np.testing.assert_allclose(idx, np.round(idx), atol=1e-4)  # exactly pixel centres
  return np.round(idx).astype(int)


def _masks_and_valid():
  masks = np.zeros((4, LOW, LOW), np.int32)
  masks[0, 3:12, 4:15] = 1        # a rectangle with an interior
  masks[1, 20, 5:25] = 1          # a 1-px line: no interior after erosion
  # masks[2] is empty (a padded prompt slot)
  masks[3, 0:6, 0:6] = 1          # in the corner
  valid = np.zeros((LOW, LOW), bool)
  valid[:24, :] = True            # bottom rows are padding
  return masks, valid


def _sample(masks, valid, seed, num_positive=5, num_negative=6):
  pts, labs = prompts.sample_points(
      tf.constant(masks), tf.constant(valid), num_positive=num_positive,
      num_negative=num_negative, input_size=INPUT, seed=tf.constant(seed, tf.int64))
  return pts.numpy(), labs.numpy()


def test_sample_points_shapes_and_labels():
  masks, valid = _masks_and_valid()
  pts, labs = _sample(masks, valid, [1, 2])
  assert pts.shape == (4, 11, 2) and pts.dtype == np.float32
  assert labs.shape == (4, 11) and labs.dtype == np.int32
  for p in (0, 1, 3):
    np.testing.assert_array_equal(labs[p], [1] * 5 + [0] * 6)
  np.testing.assert_array_equal(labs[2, :5], [-1] * 5)  # empty object: no positives
  np.testing.assert_array_equal(pts[2, :5], 0.0)


def test_sample_points_positive_inside_eroded_object():
  masks, valid = _masks_and_valid()
  for seed in range(5):
    pts, labs = _sample(masks, valid, [seed, 7], num_positive=20, num_negative=0)
    for p in (0, 1, 3):
      m = masks[p].astype(bool)
      eroded = _np_erode(m)
      region = eroded if eroded.any() else m
      xy = _to_low_res(pts[p])
      assert region[xy[:, 1], xy[:, 0]].all(), (p, xy)
      assert (labs[p] == 1).all()
    # The rectangle's border pixels are never positive (erosion is applied).
    xy = _to_low_res(pts[0])
    assert ((xy[:, 1] > 3) & (xy[:, 1] < 11) & (xy[:, 0] > 4) & (xy[:, 0] < 14)).all()


def test_sample_points_negative_outside_object_inside_valid():
  masks, valid = _masks_and_valid()
  for seed in range(5):
    pts, labs = _sample(masks, valid, [seed, 8], num_positive=1, num_negative=30)
    for p in range(4):
      xy = _to_low_res(pts[p, 1:])
      assert (labs[p, 1:] == 0).all()
      assert not masks[p][xy[:, 1], xy[:, 0]].any()
      assert valid[xy[:, 1], xy[:, 0]].all()


def test_sample_points_no_background_left():
  masks = np.ones((1, LOW, LOW), np.int32)
  valid = np.ones((LOW, LOW), bool)
  pts, labs = _sample(masks, valid, [0, 0], num_positive=2, num_negative=2)
  np.testing.assert_array_equal(labs, [[1, 1, -1, -1]])
  np.testing.assert_array_equal(pts[0, 2:], 0.0)


def test_sample_points_deterministic_per_seed():
  masks, valid = _masks_and_valid()
  a = _sample(masks, valid, [4, 4])
  b = _sample(masks, valid, [4, 4])
  c = _sample(masks, valid, [4, 5])
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def test_sample_points_covers_object_uniformly():
  masks = np.zeros((1, LOW, LOW), np.int32)
  masks[0, 10:14, 10:14] = 1  # eroded interior: the 2x2 block 11..12
  valid = np.ones((LOW, LOW), bool)
  pts, _ = _sample(masks, valid, [0, 1], num_positive=400, num_negative=0)
  xy = _to_low_res(pts[0])
  cells, counts = np.unique(xy, axis=0, return_counts=True)
  np.testing.assert_array_equal(cells, [[11, 11], [11, 12], [12, 11], [12, 12]])
  assert counts.min() > 60


def test_erode_matches_numpy():
  rng = np.random.default_rng(0)
  m = (rng.uniform(size=(3, 16, 16)) > 0.3).astype(np.float32)
  out = prompts.erode(tf.constant(m)).numpy()
  for i in range(3):
    np.testing.assert_array_equal(out[i], _np_erode(m[i].astype(bool)).astype(np.float32))
