"""Tests for tff_sam.models.losses against hand-computed and numpy reference values."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tff_sam.models import losses

LN2 = math.log(2.0)
KINDS = ("dice_ce", "bce", "focal_dice")


# ----------------------------------------------------------------------------- numpy reference


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_terms(logits, y):
  """Per-prompt dice loss, bce, focal, hard IoU, and the prompt-valid flags."""
  logits, y = np.asarray(logits, np.float64), np.asarray(y, np.float64)
  valid = (y >= 0).astype(np.float64)
  t = np.maximum(y, 0)
  p = _sigmoid(logits)
  ax = (-2, -1)
  eps = 1e-6
  dice = 1 - (2 * (p * t * valid).sum(ax) + eps) / (((p ** 2 + t ** 2) * valid).sum(ax) + eps)
  ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  n = np.maximum(valid.sum(ax), 1)
  bce = (ce * valid).sum(ax) / n
  p_t = p * t + (1 - p) * (1 - t)
  alpha_t = 0.25 * t + 0.75 * (1 - t)
  focal = (alpha_t * ce * (1 - p_t) ** 2 * valid).sum(ax) / n
  pred = (logits > 0) * valid
  inter = (pred * t).sum(ax)
  union = np.maximum(pred, t * valid).sum(ax)
  iou = inter / np.maximum(union, eps)
  prompt_valid = (valid.sum(ax) > 0).astype(np.float64)
  return dict(dice=dice, bce=bce, focal=focal, iou=iou, prompt_valid=prompt_valid)


def _np_loss(logits, y, iou_pred, kind, iou_weight=0.0):
  d = _np_terms(logits, y)
  per = {"dice_ce": d["dice"] + d["bce"], "bce": d["bce"],
         "focal_dice": 20 * d["focal"] + d["dice"]}[kind]
  if iou_weight:
    per = per + iou_weight * (np.asarray(iou_pred, np.float64) - d["iou"]) ** 2
  return (per * d["prompt_valid"]).sum() / max(d["prompt_valid"].sum(), 1.0)


def _tf_inputs(logits, y):
  logits = tf.constant(logits, tf.float32)
  y = tf.constant(y, tf.float32)
  valid = tf.cast(y >= 0, tf.float32)
  return logits, tf.maximum(y, 0.0), valid


def _random_case(seed, b=2, p=3, l=6, ignore_frac=0.2, soft=False):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 2.0, (b, p, l, l)).astype(np.float32)
  y = (rng.uniform(size=(b, p, l, l)) < 0.4).astype(np.float32)
  if soft:  # coverage targets: fractional values on some pixels
    frac = rng.uniform(size=y.shape) < 0.3
    y[frac] = rng.uniform(0.05, 0.95, size=int(frac.sum())).astype(np.float32)
  y[rng.uniform(size=y.shape) < ignore_frac] = -1
  iou = rng.uniform(size=(b, p)).astype(np.float32)
  return logits, y, iou


# ----------------------------------------------------------------------------- hand values
# One prompt on 2x2 pixels, all logits 0 (prob 0.5); target [[1, 0], [0, -1]].
# Dice: inter 0.5, denom 3 * 0.25 + 1 = 1.75 -> loss 1 - 1 / 1.75 = 3/7.
# BCE: ln 2 per valid pixel. Hard IoU: nothing predicted -> 0.
# Focal: ce ln2 * (1 - 0.5)^2 * alpha_t (0.25 on the 1 fg px, 0.75 on the 2 bg px);
# mean over the 3 valid px = ln2 * 0.25 * 1.75 / 3 = 7 ln2 / 48.

HAND_LOGITS = np.zeros((1, 1, 2, 2), np.float32)
HAND_Y = np.array([[[[1, 0], [0, -1]]]], np.float32)
HAND_IOU_PRED = np.array([[0.5]], np.float32)


def test_soft_dice_hand():
  logits, t, v = _tf_inputs(HAND_LOGITS, HAND_Y)
  out = losses.soft_dice_loss(tf.sigmoid(logits), t, v).numpy()
  assert out.shape == (1, 1)
  np.testing.assert_allclose(out, [[3 / 7]], rtol=1e-5)


def test_soft_dice_perfect_and_worst():
  t = np.array([[[[1, 0], [1, 0]]]], np.float32)
  v = np.ones_like(t)
  np.testing.assert_allclose(losses.soft_dice_loss(t, t, v).numpy(), [[0.0]], atol=1e-6)
  np.testing.assert_allclose(losses.soft_dice_loss(1 - t, t, v).numpy(), [[1.0]], atol=1e-6)
  # Both empty: (0 + eps) / (0 + eps) -> loss 0.
  z = np.zeros_like(t)
  np.testing.assert_allclose(losses.soft_dice_loss(z, z, v).numpy(), [[0.0]], atol=1e-6)


def test_bce_hand():
  logits, t, v = _tf_inputs(HAND_LOGITS, HAND_Y)
  np.testing.assert_allclose(losses.bce_per_prompt(logits, t, v).numpy(), [[LN2]], rtol=1e-5)
  # logit 2 on a foreground pixel, -1 on background, one ignored pixel with a huge logit.
  logits = np.array([[[[2.0, -1.0], [0.0, 50.0]]]], np.float32)
  y = np.array([[[[1, 0], [1, -1]]]], np.float32)
  expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + LN2) / 3
  np.testing.assert_allclose(losses.bce_per_prompt(*_tf_inputs(logits, y)).numpy(),
                             [[expected]], rtol=1e-5)


def test_hard_iou_hand():
  logits = np.array([[[[1.0, 1.0, -1.0], [1.0, -1.0, 5.0]]]], np.float32)
  y = np.array([[[[1, 0, 1], [1, 1, -1]]]], np.float32)
  # pred on valid px: (0,0) (0,1) (1,0); target: (0,0) (0,2) (1,0) (1,1); the ignored
  # (1,2) is predicted but does not count. inter 2, union 5.
  np.testing.assert_allclose(losses.hard_iou(*_tf_inputs(logits, y)).numpy(), [[2 / 5]],
                             rtol=1e-6)
  # Empty prediction and empty target -> 0 (not NaN).
  z = np.zeros((1, 1, 2, 2), np.float32)
  assert losses.hard_iou(*_tf_inputs(z - 1, z)).numpy()[0, 0] == 0.0


@pytest.mark.parametrize("kind,expected", [
    ("dice_ce", 3 / 7 + LN2),
    ("bce", LN2),
    ("focal_dice", 20 * 7 * LN2 / 48 + 3 / 7),
])
def test_mask_loss_hand(kind, expected):
  pred = {"masks": tf.constant(HAND_LOGITS), "iou": tf.constant(HAND_IOU_PRED)}
  out = losses.mask_loss(tf.constant(HAND_Y), pred, kind=kind)
  assert out.shape == ()
  np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5)
  # IoU head term: (0.5 - 0)^2 weighted.
  out = losses.mask_loss(tf.constant(HAND_Y), pred, kind=kind, iou_weight=2.0)
  np.testing.assert_allclose(out.numpy(), expected + 2 * 0.25, rtol=1e-5)


def test_focal_hand():
  logits, t, v = _tf_inputs(HAND_LOGITS, HAND_Y)
  np.testing.assert_allclose(losses.focal_per_prompt(logits, t, v).numpy(), [[7 * LN2 / 48]],
                             rtol=1e-5)


# ----------------------------------------------------------------------------- numpy parity


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_prompt_terms_match_numpy(seed):
  logits, y, _ = _random_case(seed)
  ref = _np_terms(logits, y)
  lg, t, v = _tf_inputs(logits, y)
  np.testing.assert_allclose(losses.soft_dice_loss(tf.sigmoid(lg), t, v).numpy(), ref["dice"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.bce_per_prompt(lg, t, v).numpy(), ref["bce"], rtol=1e-5)
  np.testing.assert_allclose(losses.focal_per_prompt(lg, t, v).numpy(), ref["focal"],
                             rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(losses.hard_iou(lg, t, v).numpy(), ref["iou"], rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("iou_weight", [0.0, 1.0])
def test_mask_loss_matches_numpy(kind, iou_weight):
  logits, y, iou = _random_case(3)
  y[0, 1] = -1  # a whole padded prompt slot
  pred = {"masks": tf.constant(logits), "iou": tf.constant(iou)}
  out = losses.mask_loss(tf.constant(y), pred, kind=kind, iou_weight=iou_weight).numpy()
  np.testing.assert_allclose(out, _np_loss(logits, y, iou, kind, iou_weight), rtol=1e-5)
  # The Keras wrapper computes the same.
  keras_loss = losses.MaskLoss(kind, iou_weight=iou_weight)
  np.testing.assert_allclose(keras_loss(tf.constant(y), pred).numpy(), out, rtol=1e-6)
  assert keras_loss.get_config() == {"kind": kind, "iou_weight": iou_weight, "name": "mask_loss"}


@pytest.mark.parametrize("kind", KINDS)
def test_mask_loss_soft_targets_match_numpy(kind):
  logits, y, iou = _random_case(10, soft=True)
  assert ((y > 0) & (y < 1)).any()
  pred = {"masks": tf.constant(logits), "iou": tf.constant(iou)}
  out = losses.mask_loss(tf.constant(y), pred, kind=kind, iou_weight=1.0).numpy()
  np.testing.assert_allclose(out, _np_loss(logits, y, iou, kind, 1.0), rtol=1e-5)


def test_soft_target_bce_minimum_at_target():
  """With soft targets, BCE is minimal where sigmoid(logit) equals the coverage."""
  t = np.full((1, 1, 1, 1), 0.3, np.float32)
  best = np.log(0.3 / 0.7)
  values = [float(losses.mask_loss(tf.constant(t), {"masks": tf.constant(t * 0 + x),
                                                    "iou": tf.zeros((1, 1))}, kind="bce"))
            for x in (best - 0.5, best, best + 0.5)]
  assert values[1] < values[0] and values[1] < values[2]


def test_iou_weight_changes_loss_and_kinds_differ():
  logits, y, iou = _random_case(4)
  pred = {"masks": tf.constant(logits), "iou": tf.constant(iou)}
  values = {k: float(losses.mask_loss(tf.constant(y), pred, kind=k)) for k in KINDS}
  assert len(set(round(v, 6) for v in values.values())) == 3
  with_iou = float(losses.mask_loss(tf.constant(y), pred, iou_weight=1.0))
  assert with_iou > values["dice_ce"]


def test_unknown_kind():
  pred = {"masks": tf.constant(HAND_LOGITS), "iou": tf.constant(HAND_IOU_PRED)}
  with pytest.raises(ValueError, match="unknown loss"):
    losses.mask_loss(tf.constant(HAND_Y), pred, kind="dice")


# ----------------------------------------------------------------------------- ignore label


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("iou_weight", [0.0, 1.0])
def test_ignored_pixels_contribute_nothing(kind, iou_weight):
  logits, y, iou = _random_case(5)
  changed = logits.copy()
  changed[y < 0] = np.random.default_rng(9).normal(0, 10, size=int((y < 0).sum()))
  def loss(lg):
    return float(losses.mask_loss(tf.constant(y), {"masks": tf.constant(lg), "iou": tf.constant(iou)},
                                  kind=kind, iou_weight=iou_weight))
  assert (y < 0).sum() > 5
  np.testing.assert_allclose(loss(changed), loss(logits), rtol=1e-6)
  # Gradient w.r.t. ignored pixels is exactly zero; elsewhere it is not all zero.
  lg = tf.Variable(logits)
  with tf.GradientTape() as tape:
    value = losses.mask_loss(tf.constant(y), {"masks": lg, "iou": tf.constant(iou)},
                             kind=kind, iou_weight=iou_weight)
  grad = tape.gradient(value, lg).numpy()
  assert (grad[y < 0] == 0).all()
  assert np.abs(grad[y >= 0]).max() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_padded_prompt_slots_contribute_nothing(kind):
  logits, y, iou = _random_case(6, b=1, p=1)
  base = float(losses.mask_loss(tf.constant(y), {"masks": tf.constant(logits),
                                                 "iou": tf.constant(iou)},
                                kind=kind, iou_weight=1.0))
  # Add two all -1 slots with arbitrary logits and IoU predictions.
  rng = np.random.default_rng(1)
  logits3 = np.concatenate([logits, rng.normal(0, 5, (1, 2, 6, 6)).astype(np.float32)], axis=1)
  y3 = np.concatenate([y, -np.ones((1, 2, 6, 6), np.float32)], axis=1)
  iou3 = np.concatenate([iou, [[0.9, 0.1]]], axis=1).astype(np.float32)
  padded = float(losses.mask_loss(tf.constant(y3), {"masks": tf.constant(logits3),
                                                    "iou": tf.constant(iou3)},
                                  kind=kind, iou_weight=1.0))
  np.testing.assert_allclose(padded, base, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_no_valid_prompt_gives_zero_not_nan(kind):
  y = -np.ones((2, 3, 4, 4), np.float32)
  lg = tf.Variable(np.random.default_rng(0).normal(size=y.shape).astype(np.float32))
  iou = tf.Variable(np.full((2, 3), 0.7, np.float32))
  with tf.GradientTape() as tape:
    value = losses.mask_loss(tf.constant(y), {"masks": lg, "iou": iou}, kind=kind,
                             iou_weight=1.0)
  assert value.numpy() == 0.0
  g_masks, g_iou = tape.gradient(value, [lg, iou])
  assert np.isfinite(g_masks.numpy()).all() and (g_masks.numpy() == 0).all()
  assert (g_iou.numpy() == 0).all()


def test_batch_mean_is_over_valid_prompts_only():
  # Two valid prompts with losses a and b and one padded slot: the mean is (a + b) / 2.
  logits, y, iou = _random_case(7, b=1, p=3)
  y[0, 2] = -1
  pred = {"masks": tf.constant(logits), "iou": tf.constant(iou)}
  ref = _np_terms(logits, y)
  out = float(losses.mask_loss(tf.constant(y), pred, kind="bce"))
  np.testing.assert_allclose(out, ref["bce"][0, :2].mean(), rtol=1e-5)


# ----------------------------------------------------------------------------- metrics


def test_mean_dice_sums():
  metric = losses.MeanDice()
  # Batch 1: prompt 0 pred {a, b}, target {a, c} -> dice 2*1/4 = 0.5;
  #          prompt 1 all ignored -> not counted.
  logits1 = np.array([[[[1, 1], [-1, -1]], [[1, 1], [1, 1]]]], np.float32)
  y1 = np.array([[[[1, 0], [1, -1]], [[-1, -1], [-1, -1]]]], np.float32)
  # The ignored pixel (1, 1) of prompt 0 is predicted -1 anyway; make it +1 to test masking.
  logits1[0, 0, 1, 1] = 5.0
  metric.update_state(tf.constant(y1), {"masks": tf.constant(logits1), "iou": tf.zeros((1, 2))})
  np.testing.assert_allclose(metric.total.numpy(), 0.5)
  np.testing.assert_allclose(metric.count.numpy(), 1.0)
  # Batch 2: a perfect prompt (1.0), and a prompt with empty target and empty prediction
  # (1.0 by convention), and one with empty target but a false positive (0.0).
  logits2 = np.array([[[[1, -1], [-1, -1]], [[-1, -1], [-1, -1]], [[-1, 1], [-1, -1]]]],
                     np.float32)
  y2 = np.array([[[[1, 0], [0, 0]], [[0, 0], [0, -1]], [[0, 0], [0, 0]]]], np.float32)
  metric.update_state(tf.constant(y2), {"masks": tf.constant(logits2), "iou": tf.zeros((1, 3))})
  np.testing.assert_allclose(metric.total.numpy(), 2.5)
  np.testing.assert_allclose(metric.count.numpy(), 4.0)
  np.testing.assert_allclose(metric.result().numpy(), 2.5 / 4)
  metric.reset_state()
  assert metric.total.numpy() == 0 and metric.count.numpy() == 0
  assert metric.result().numpy() == 0.0  # no NaN when empty


def test_mean_dice_state_is_sums_over_batches():
  """Two updates equal one update on the concatenated batch (TFF sums the state)."""
  logits, y, _ = _random_case(8, b=4)
  y[1, 2] = -1
  whole, halves = losses.MeanDice(), losses.MeanDice()
  whole.update_state(tf.constant(y), {"masks": tf.constant(logits)})
  halves.update_state(tf.constant(y[:1]), {"masks": tf.constant(logits[:1])})
  halves.update_state(tf.constant(y[1:]), {"masks": tf.constant(logits[1:])})
  np.testing.assert_allclose(halves.total.numpy(), whole.total.numpy(), rtol=1e-6)
  assert halves.count.numpy() == whole.count.numpy() == 4 * 3 - 1
  # And it equals the numpy per-prompt Dice of thresholded predictions.
  pred = (logits > 0) & (y >= 0)
  t = y > 0
  dices = []
  for b in range(4):
    for p in range(3):
      if (y[b, p] >= 0).any():
        dices.append(losses.dice_iou(pred[b, p], t[b, p])[0])
  np.testing.assert_allclose(whole.result().numpy(), np.mean(dices), rtol=1e-5)


# ----------------------------------------------------------------------------- dice_iou


@pytest.mark.parametrize("pred,target,dice,iou", [
    ([[1, 1], [0, 0]], [[1, 0], [1, 0]], 0.5, 1 / 3),
    ([[1, 1], [0, 0]], [[1, 1], [0, 0]], 1.0, 1.0),
    ([[1, 0], [0, 0]], [[0, 0], [0, 1]], 0.0, 0.0),
    ([[0, 0], [0, 0]], [[0, 0], [0, 1]], 0.0, 0.0),
    ([[1, 1], [1, 0]], [[1, 0], [0, 0]], 0.5, 1 / 3),
    ([[0, 0], [0, 0]], [[0, 0], [0, 0]], 1.0, 1.0),
])
def test_dice_iou_hand(pred, target, dice, iou):
  d, i = losses.dice_iou(np.array(pred), np.array(target))
  assert isinstance(d, float) and isinstance(i, float)
  assert d == pytest.approx(dice) and i == pytest.approx(iou)
