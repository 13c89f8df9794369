"""Mixed and iterative prompting (`--prompt=mixed`, `iterative`) and mask prompts, on
the tiny config."""

import numpy as np
import pytest
import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam.data import pipeline
from tff_sam.evaluation import inference
from tff_sam.models import build
from tff_sam.models import losses
from tff_sam.models import point_prompts
from tff_sam.models import sam as sam_lib

L = 16


def _target():
  """One 16x16 target: object rows 4..7 x cols 4..7, ignored last row."""
  t = np.zeros((1, 1, L, L), np.float32)
  t[0, 0, 4:8, 4:8] = 1.0
  t[0, 0, -1] = -1.0
  return t


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corrective_point_is_positive_on_missed_object(seed):
  logits = np.full((1, 1, L, L), -5.0, np.float32)  # Predicts nothing.
  xy, label = point_prompts.corrective_points(logits, _target(), input_size=64,
                                        seed=tf.constant([seed, 7]))
  assert int(label[0, 0]) == point_prompts.POSITIVE
  col, row = (float(v) for v in (xy[0, 0] - 1.5) / 4)  # Low-res pixel centres.
  assert 4 <= row < 8 and 4 <= col < 8


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corrective_point_is_negative_on_wrong_background_and_never_ignored(seed):
  logits = np.full((1, 1, L, L), 5.0, np.float32)  # Predicts everything.
  xy, label = point_prompts.corrective_points(logits, _target(), input_size=64,
                                        seed=tf.constant([seed, 3]))
  assert int(label[0, 0]) == point_prompts.NEGATIVE
  col, row = (float(v) for v in (xy[0, 0] - 1.5) / 4)
  assert row < L - 1 and not (4 <= row < 8 and 4 <= col < 8)


def test_no_corrective_point_when_the_mask_is_right():
  logits = np.where(_target() >= 0.5, 5.0, -5.0).astype(np.float32)
  _, label = point_prompts.corrective_points(logits, _target(), input_size=64,
                                       seed=tf.constant([0, 0]))
  assert int(label[0, 0]) == point_prompts.NO_TOKEN


def _example(bundle, sub_iterations=3, evaluation=False, prompt=config_lib.ITERATIVE_PROMPT,
             seed=3):
  """(spec, example, low-res side) of one image with two objects."""
  spec = pipeline.build_pipeline_spec(
      sam_config=bundle.config, manifest_dir=".", prompt=prompt,
      prompts_per_image=2, sub_iterations=sub_iterations, evaluation=evaluation)
  size, low = spec.input_size, spec.low_res
  labels = -np.ones((size, size), np.int32)
  labels[: size * 3 // 4, : size * 3 // 4] = 0
  labels[4:20, 4:20] = 1
  labels[30:44, 24:40] = 2
  record = {"object_ids": tf.constant([1, 2]), "labels": tf.constant(labels),
            "boxes": tf.constant([[4, 4, 19, 19], [24, 30, 39, 43]], tf.float32),
            "embedding": tf.zeros(sam_lib.embedding_shape(bundle.config))}
  ex = pipeline.make_example(record, tf.constant([seed, 4]), spec)
  return spec, ex, low


def test_iterative_examples_carry_the_first_point_and_empty_correction_slots(bundle):
  spec, ex, low = _example(bundle)
  x = ex["x"]
  assert x["points"].shape == (2, 3, 2) and x["point_labels"].shape == (2, 3)
  np.testing.assert_array_equal(x["point_labels"][:, 1:], point_prompts.NO_TOKEN)
  assert set(x["point_labels"][:, 0].numpy()) <= {point_prompts.POSITIVE}
  assert x["target"].shape == (2, low, low)
  np.testing.assert_array_equal(x["target"], ex["y"])
  assert set(x["use_box"].numpy()) <= {0, 1} and x["seed"].shape == (2,)
  _, evaluation, _ = _example(bundle, evaluation=True)
  np.testing.assert_array_equal(evaluation["x"]["use_box"], [1, 1])  # Always the box.
  del spec


def test_iterative_model_scores_every_pass_in_training_and_returns_the_last_otherwise(bundle):
  _, ex, low = _example(bundle)
  batch = {k: v[None] for k, v in ex["x"].items()}
  model = build.build_prompt_mask_decoder(bundle, prompt=config_lib.ITERATIVE_PROMPT)
  train = model(batch, training=True)
  assert train["masks"].shape == (1, 6, low, low) and train["iou"].shape == (1, 6)
  infer = model(batch, training=False)
  assert infer["masks"].shape == (1, 2, low, low)
  # The last pass of training is the evaluation output (same seed, same clicks).
  np.testing.assert_allclose(train["masks"][:, 4:], infer["masks"], atol=1e-5)
  # The first pass differs from the refined last one (corrections and mask prompt used).
  assert not np.allclose(train["masks"][:, :2], infer["masks"], atol=1e-4)
  # The loss tiles its targets over the passes and has gradients for the decoder only.
  with tf.GradientTape() as tape:
    loss = losses.mask_loss(ex["y"][None], model(batch, training=True), iou_weight=1.0)
  grads = tape.gradient(loss, model.trainable_weights)
  assert np.isfinite(float(loss)) and all(g is not None for g in grads)
  assert all(w.name.startswith("mask_decoder/") for w in model.trainable_weights)


def test_mask_prompt_changes_the_prediction_and_batches_per_prompt(bundle):
  model = build.build_prompt_mask_decoder(bundle, prompt=config_lib.BOX_PROMPT)
  shape = sam_lib.embedding_shape(bundle.config)
  low = sam_lib.low_res_size(bundle.config)
  rng = np.random.default_rng(0)
  x = {"image_embeddings": rng.normal(size=(1,) + shape).astype(np.float32),
       "boxes": np.array([[[2, 2, 20, 20], [10, 10, 40, 30]]], np.float32),
       "points": np.zeros((1, 2, 1, 2), np.float32),
       "point_labels": -np.ones((1, 2, 1), np.int32)}
  plain = model(x)["masks"].numpy()
  prompt_a = rng.normal(size=(1, 2, low, low)).astype(np.float32)
  with_masks = model({**x, "mask_inputs": prompt_a})["masks"].numpy()
  assert with_masks.shape == plain.shape and not np.allclose(with_masks, plain, atol=1e-4)
  # Prompt k's mask prompt affects prompt k only.
  prompt_b = prompt_a.copy()
  prompt_b[0, 1] = 0
  other = model({**x, "mask_inputs": prompt_b})["masks"].numpy()
  np.testing.assert_allclose(other[0, 0], with_masks[0, 0], atol=1e-5)
  assert not np.allclose(other[0, 1], with_masks[0, 1], atol=1e-4)


def test_corrective_clicks_at_original_resolution():
  pred = np.zeros((2, 20, 30), bool)
  truth = np.zeros((2, 20, 30), bool)
  truth[0, 2:9, 3:12] = True          # Object 0: missed entirely -> positive at its centre.
  pred[1, 10:19, 10:29] = True        # Object 1: predicted too large -> negative.
  truth[1, 10:13, 10:13] = True
  pred[1, 10:13, 10:13] = True
  points, labels = inference.correction_clicks(pred, truth)
  assert labels.tolist() == [1, 0]
  x, y = points[0]
  assert 3 <= x < 12 and 2 <= y < 9 and truth[0, int(y), int(x)]
  x, y = points[1]
  assert pred[1, int(y), int(x)] and not truth[1, int(y), int(x)]
  _, none = inference.correction_clicks(truth, truth)
  assert none.tolist() == [-10, -10]



def test_mixed_examples_draw_boxes_and_points_per_object(bundle):
  """`--prompt=mixed`: one positive point and the box per object, and which one the
  model gets drawn per object and step (both kinds, about half each)."""
  draws = [_example(bundle, prompt=config_lib.MIXED_PROMPT, seed=seed)[1]["x"]
           for seed in range(40)]
  x = draws[0]
  assert x["points"].shape == (2, 1, 2) and x["boxes"].shape == (2, 4)
  assert set(x["point_labels"].numpy().ravel()) == {point_prompts.POSITIVE}
  assert "target" not in x and "seed" not in x  # No corrections.
  use_box = np.stack([d["use_box"].numpy() for d in draws])
  assert set(use_box.ravel()) == {0, 1} and 0.3 < use_box.mean() < 0.7
  assert set(use_box[:, 0]) == {0, 1} and set(use_box[:, 1]) == {0, 1}  # Per object.


def test_mixed_model_prompts_each_object_with_its_box_or_its_point(bundle):
  """Where `use_box` is 1 the mask is the box-prompted one, else the point-prompted one."""
  rng = np.random.default_rng(0)
  shape = sam_lib.embedding_shape(bundle.config)
  x = {"image_embeddings": rng.normal(size=(1,) + shape).astype(np.float32),
       "boxes": np.array([[[2, 2, 20, 20], [10, 10, 40, 30]]], np.float32),
       "points": np.array([[[[8, 8]], [[20, 20]]]], np.float32),
       "point_labels": np.ones((1, 2, 1), np.int32),
       "use_box": np.array([[1, 0]], np.int32)}
  models = {mode: build.build_prompt_mask_decoder(bundle, prompt=mode) for mode in (
      config_lib.MIXED_PROMPT, config_lib.BOX_PROMPT, config_lib.POINTS_PROMPT)}
  for model in models.values():
    model.set_weights(models[config_lib.MIXED_PROMPT].get_weights())
  mixed = models[config_lib.MIXED_PROMPT](x)["masks"].numpy()
  boxed = models[config_lib.BOX_PROMPT](x)["masks"].numpy()
  pointed = models[config_lib.POINTS_PROMPT](x)["masks"].numpy()
  np.testing.assert_allclose(mixed[0, 0], boxed[0, 0], atol=1e-5)
  np.testing.assert_allclose(mixed[0, 1], pointed[0, 1], atol=1e-5)
  assert not np.allclose(boxed[0, 1], pointed[0, 1], atol=1e-3)
