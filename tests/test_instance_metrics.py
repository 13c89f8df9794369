"""mSA / SA50 / SA75 (`evaluation.instance_metrics`) on hand-computed cases."""

import numpy as np
import pytest

from tff_sam.evaluation import instance_metrics


def _case():
  """Two true objects; three predicted: one exact, one at IoU 9/11 = 0.818, one stray pixel."""
  true = np.zeros((6, 6), np.int32)
  true[0:2, 0:4] = 1  # 8 pixels
  true[3:6, 3:6] = 2  # 9 pixels
  pred = np.zeros((6, 6), np.int32)
  pred[0:2, 0:4] = 7  # == object 1: IoU 1
  pred[3:6, 3:6] = 3  # object 2 ...
  pred[3:5, 2] = 3  # ... and 2 more pixels: IoU 9 / 11
  pred[5, 0] = 9  # a false positive
  return true, pred


def test_iou_matrix_by_hand():
  true, pred = _case()
  # Predicted objects in label order: 3, 7, 9.
  np.testing.assert_allclose(instance_metrics.iou_matrix(true, pred),
                             [[0.0, 1.0, 0.0], [9 / 11, 0.0, 0.0]])


def test_segmentation_accuracy_by_hand():
  """SA(t) = TP / (TP + FP + FN) with 2 true and 3 predicted objects:
  t <= 0.80: TP 2 -> 2 / 3; t >= 0.85: TP 1 -> 1 / 4.
  mSA = (7 x 2/3 + 3 x 1/4) / 10 = 65 / 120."""
  true, pred = _case()
  result = instance_metrics.segmentation_accuracy(true, pred)
  assert list(result["per_threshold"]) == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9,
                                           0.95]
  for t, sa in result["per_threshold"].items():
    assert sa == pytest.approx(2 / 3 if t <= 0.8 else 1 / 4), t
  assert result["msa"] == pytest.approx(65 / 120)
  assert result["sa50"] == pytest.approx(2 / 3) and result["sa75"] == pytest.approx(2 / 3)
  assert (result["num_true"], result["num_predicted"]) == (2, 3)
  # Label values do not matter, only the objects.
  relabeled = np.where(pred == 7, 1, np.where(pred == 3, 2, np.where(pred == 9, 3, 0)))
  assert instance_metrics.segmentation_accuracy(true, relabeled)["msa"] == pytest.approx(65 / 120)
  perfect = instance_metrics.segmentation_accuracy(true, true)
  assert perfect["msa"] == 1.0 and perfect["sa75"] == 1.0


def test_matching_is_optimal_not_greedy():
  """Greedy (best IoU first) would pair (0, 0) and leave true object 1 unmatched."""
  iou = np.array([[0.60, 0.55], [0.58, 0.0]])
  assert instance_metrics.true_positives(iou, 0.5) == 2
  assert instance_metrics.true_positives(iou, 0.59) == 1
  assert instance_metrics.true_positives(iou, 0.7) == 0
  assert instance_metrics.true_positives(np.zeros((0, 3)), 0.5) == 0


def test_elf_thresholds_an_iou_of_exactly_three_quarters_misses_0_75():
  """elf's `np.arange(0.5, 1.0, 0.05)` puts "0.75" at 0.7500000000000002."""
  true = np.zeros((4, 4), np.int32)
  true[0:3, 0:3] = 1  # 9 pixels
  pred = np.zeros((4, 4), np.int32)
  pred[0:3, 0:4] = 1  # 12 pixels: IoU 9 / 12 = 0.75 exactly
  result = instance_metrics.segmentation_accuracy(true, pred)
  assert result["per_threshold"][0.7] == 1.0 and result["sa75"] == 0.0
  assert result["msa"] == pytest.approx(0.5)  # 0.50-0.70 match; "0.75"-0.95 do not.


def test_empty_images_score_zero_as_in_elf():
  empty = np.zeros((4, 4), np.int32)
  one = empty.copy()
  one[1, 1] = 1
  assert instance_metrics.segmentation_accuracy(empty, empty)["msa"] == 0.0
  assert instance_metrics.segmentation_accuracy(one, empty)["msa"] == 0.0
  assert instance_metrics.segmentation_accuracy(empty, one)["msa"] == 0.0


def test_stitch_masks_later_masks_win_and_errors():
  a = np.zeros((3, 3), bool)
  a[0:2, 0:2] = True
  b = np.zeros((3, 3), bool)
  b[1:3, 1:3] = True
  labels = instance_metrics.stitch_masks([a, b])
  np.testing.assert_array_equal(labels, [[1, 1, 0], [1, 2, 2], [0, 2, 2]])
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(instance_metrics.stitch_masks([], shape=(2, 2)),
                                np.zeros((2, 2)))
  with pytest.raises(ValueError, match="needs a shape"):
    instance_metrics.stitch_masks([])
  with pytest.raises(ValueError, match="mask 1 has shape"):
    instance_metrics.stitch_masks([a, np.zeros((2, 2), bool)])
  with pytest.raises(ValueError, match="differ in shape"):
    instance_metrics.iou_matrix(np.zeros((2, 2)), np.zeros((3, 3)))
