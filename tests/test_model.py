"""Tests for tff_sam.models: loading, the PromptMaskDecoder, graph safety, weights."""

import logging

import huggingface_hub
import numpy as np
import pytest
import tensorflow as tf

from tff_sam import errors
from tff_sam.models import build
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import losses
from tff_sam.models import sam as sam_lib

MODES = ("box", "points", "both")


def _inputs(config, seed=0, batch=2, prompts=3):
  rng = np.random.default_rng(seed)
  side = sam_lib.image_size(config)
  corners = np.sort(rng.uniform(0, side - 1, (batch, prompts, 2, 2)), axis=2)
  return {
      "image_embeddings": rng.normal(
          size=(batch,) + sam_lib.embedding_shape(config)).astype(np.float32),
      "boxes": corners.reshape(batch, prompts, 4).astype(np.float32),
      "points": rng.uniform(0, side - 1, (batch, prompts, 2, 2)).astype(np.float32),
      # positive+negative, positive+padding, two positives
      "point_labels": np.tile(np.array([[1, 0], [1, -1], [1, 1]], np.int32)[:prompts],
                              (batch, 1, 1)),
  }


def _sam_reference(sam, inputs, mode):
  kwargs = dict(image_embeddings=tf.constant(inputs["image_embeddings"]),
                multimask_output=False, pixel_values=None)
  if mode in ("box", "both"):
    kwargs["input_boxes"] = tf.constant(inputs["boxes"])
  if mode in ("points", "both"):
    kwargs["input_points"] = tf.constant(inputs["points"])
    kwargs["input_labels"] = tf.constant(inputs["point_labels"])
  out = sam(**kwargs)
  return out.pred_masks.numpy()[:, :, 0], out.iou_scores.numpy()[:, :, 0]


def _by_name(model):
  """Weights keyed by name without the model's own (uniquified) top scope."""
  return {w.name.split("/", 1)[1]: w.numpy() for w in model.weights}


def _assert_close_scaled(got, want, rel=1e-4):
  """Element-wise closeness relative to the output's scale (tiny-model logits are small)."""
  scale = float(np.abs(want).max())
  assert scale > 0
  np.testing.assert_allclose(got, want, rtol=rel, atol=rel * scale)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("mode", MODES)
def test_decoder_equals_full_sam(bundle, mode):
  inputs = _inputs(bundle.config)
  m = build.build_prompt_mask_decoder(bundle, prompt=mode)
  out = m(inputs)
  low = sam_lib.low_res_size(bundle.config)
  assert out["masks"].shape == (2, 3, low, low) and out["iou"].shape == (2, 3)
  masks, iou = _sam_reference(bundle.sam, inputs, mode)
  np.testing.assert_array_equal(out["masks"].numpy(), masks)
  np.testing.assert_array_equal(out["iou"].numpy(), iou)


def test_prompt_modes_use_their_prompts(bundle):
  """Each mode reads (only) its prompts: changing an unused input changes nothing."""
  inputs = _inputs(bundle.config)
  moved = dict(inputs, boxes=inputs["boxes"][:, ::-1].copy(), points=inputs["points"] + 9.0)
  outs = {}
  for mode in MODES:
    m = build.build_prompt_mask_decoder(bundle, prompt=mode)
    outs[mode] = m(inputs)["masks"].numpy()
    moved_out = m(moved)["masks"].numpy()
    assert not np.allclose(moved_out, outs[mode], rtol=1e-3, atol=0)
  box_only = build.build_prompt_mask_decoder(bundle, prompt="box")
  np.testing.assert_array_equal(
      box_only(dict(inputs, points=inputs["points"] + 9.0))["masks"].numpy(), outs["box"])
  assert not np.allclose(outs["box"], outs["points"], rtol=1e-3, atol=0)
  assert not np.allclose(outs["box"], outs["both"], rtol=1e-3, atol=0)


def test_unknown_prompt_mode(bundle):
  with pytest.raises(ValueError, match="prompt"):
    decoder_lib.PromptMaskDecoder(bundle.config, prompt="mask")


def _run_in_legacy_graph(config, weights, inputs, mode):
  """Builds a fresh PromptMaskDecoder in a tf.Graph (as TFF does) and runs it."""
  with tf.Graph().as_default() as graph:
    model = decoder_lib.PromptMaskDecoder(config, prompt=mode)
    assert [tuple(w.shape) for w in model.weights] == [v.shape for v in weights]
    placeholders = {k: tf.compat.v1.placeholder(tf.as_dtype(v.dtype), v.shape)
                    for k, v in inputs.items()}
    outputs = model(placeholders)
    assigns = [tf.compat.v1.assign(w, v) for w, v in zip(model.weights, weights)]
    with tf.compat.v1.Session(graph=graph) as sess:
      sess.run(assigns)
      return sess.run(outputs, feed_dict={placeholders[k]: v for k, v in inputs.items()})


@pytest.mark.parametrize("mode", MODES)
def test_legacy_graph_equals_eager(bundle, mode):
  """Regression: TFF traces in a legacy tf.Graph, where tensor `==` is identity."""
  inputs = _inputs(bundle.config, seed=1)
  eager = build.build_prompt_mask_decoder(bundle, prompt=mode)
  want = eager(inputs)
  got = _run_in_legacy_graph(bundle.config, [w.numpy() for w in eager.weights], inputs, mode)
  _assert_close_scaled(got["masks"], want["masks"].numpy())
  _assert_close_scaled(got["iou"], want["iou"].numpy())


def test_legacy_graph_check_detects_stock_prompt_encoder(bundle, monkeypatch):
  """The graph test above can fail: transformers' own encoder breaks in a legacy graph."""
  from transformers.models.sam.modeling_tf_sam import TFSamPromptEncoder  # pylint: disable=g-import-not-at-top

  inputs = _inputs(bundle.config, seed=1)
  eager = build.build_prompt_mask_decoder(bundle, prompt="box")
  want = eager(inputs)
  weights = [w.numpy() for w in eager.weights]
  monkeypatch.setattr(decoder_lib, "GraphSafePromptEncoder", TFSamPromptEncoder)
  got = _run_in_legacy_graph(bundle.config, weights, inputs, "box")
  with pytest.raises(AssertionError):
    _assert_close_scaled(got["masks"], want["masks"].numpy())


def test_tf_function_equals_eager(bundle):
  inputs = _inputs(bundle.config, seed=2)
  m = build.build_prompt_mask_decoder(bundle, prompt="both")
  want = m(inputs)
  got = tf.function(m)({k: tf.constant(v) for k, v in inputs.items()})
  _assert_close_scaled(got["masks"].numpy(), want["masks"].numpy(), rel=1e-5)


# ----------------------------------------------------------------------------- weights


def test_only_mask_decoder_is_trainable(bundle):
  m = build.build_prompt_mask_decoder(bundle, prompt="both")
  trainable = [w.name for w in m.trainable_weights]
  non_trainable = [w.name for w in m.non_trainable_weights]
  assert trainable and non_trainable
  assert all("mask_decoder" in n for n in trainable), trainable
  assert not any("mask_decoder" in n for n in non_trainable), non_trainable
  assert {w.name for w in m.mask_decoder.weights} == set(trainable)
  assert {w.name for w in m.prompt_encoder.weights} | {
      w.name for w in m.shared_image_embedding.weights} == set(non_trainable)
  assert any("positional_embedding" in n for n in non_trainable)
  assert any("point_embed" in n for n in non_trainable)
  assert any("iou_prediction_head" in n for n in trainable)
  assert len(m.weights) == len(trainable) + len(non_trainable)


def test_frozen_iou_head(bundle):
  m = build.build_prompt_mask_decoder(bundle, train_iou_head=False)
  trainable = [w.name for w in m.trainable_weights]
  assert trainable and all("mask_decoder" in n for n in trainable)
  assert not any("iou_prediction_head" in n for n in trainable)
  assert any("iou_prediction_head" in w.name for w in m.non_trainable_weights)
  full = build.build_prompt_mask_decoder(bundle, train_iou_head=True)
  head = [w for w in full.trainable_weights if "iou_prediction_head" in w.name]
  assert len(full.trainable_weights) == len(trainable) + len(head)


def test_gradients_reach_only_trainable_weights(bundle):
  inputs = _inputs(bundle.config, seed=3)
  low = sam_lib.low_res_size(bundle.config)
  y = (np.random.default_rng(0).uniform(size=(2, 3, low, low)) > 0.5).astype(np.float32)
  m = build.build_prompt_mask_decoder(bundle, prompt="both")
  with tf.GradientTape() as tape:
    loss = losses.mask_loss(tf.constant(y), m(inputs, training=True), iou_weight=1.0)
  grads = tape.gradient(loss, m.trainable_weights)
  assert all(g is not None for g in grads)
  assert sum(float(tf.reduce_sum(tf.abs(g))) for g in grads) > 0


def test_build_copies_pretrained_weights(bundle):
  m = build.build_prompt_mask_decoder(bundle, prompt="both")
  sam_weights = {w.name: w.numpy() for w in bundle.sam.weights}
  for w in m.weights:
    key = f"{bundle.sam.name}/{w.name}"
    assert key in sam_weights, key
    np.testing.assert_array_equal(w.numpy(), sam_weights[key])
  # A freshly constructed model (random init) differs: the copy is what makes it equal.
  fresh = decoder_lib.PromptMaskDecoder(bundle.config, prompt="both")
  assert any(not np.array_equal(a.numpy(), b.numpy())
             for a, b in zip(fresh.trainable_weights, m.trainable_weights))


def test_weights_lists_round_trip_and_assign_to_sam(bundle):
  inputs = _inputs(bundle.config, seed=4)
  m = build.build_prompt_mask_decoder(bundle, prompt="box")
  trainable, non_trainable = decoder_lib.model_weights_lists(m)
  assert [v.shape for v in trainable] == [tuple(w.shape) for w in m.trainable_weights]
  rng = np.random.default_rng(0)
  perturbed = [v + rng.normal(0, 0.05, v.shape).astype(v.dtype) for v in trainable]
  other = build.build_prompt_mask_decoder(bundle, prompt="box")
  decoder_lib.assign_model_weights(other, perturbed, non_trainable)
  for w, v in zip(other.trainable_weights, perturbed):
    np.testing.assert_array_equal(w.numpy(), v)
  want = other(inputs)
  assert not np.allclose(want["masks"].numpy(), m(inputs)["masks"].numpy())
  # Export path: the fine-tuned decoder copied into a TFSamModel gives the same output.
  target = build.load_sam("tiny").sam
  decoder_lib.copy_prompt_decoder_weights(other, target)
  masks, iou = _sam_reference(target, inputs, "box")
  np.testing.assert_array_equal(masks, want["masks"].numpy())
  np.testing.assert_array_equal(iou, want["iou"].numpy())
  with pytest.raises(ValueError):
    decoder_lib.assign_model_weights(other, perturbed[:-1], non_trainable)


# ----------------------------------------------------------------------------- loading


def test_tiny_is_deterministic(bundle):
  again = build.load_sam("tiny")
  assert again.fingerprint == bundle.fingerprint
  assert len(bundle.fingerprint) == 16
  a, b = _by_name(bundle.sam), _by_name(again.sam)
  assert list(a) == list(b)
  for name, value in a.items():
    np.testing.assert_array_equal(value, b[name], err_msg=name)
  config = bundle.config
  side = sam_lib.image_size(config)
  assert side == config.vision_config.image_size
  c, s, s2 = sam_lib.embedding_shape(config)
  assert s == s2 == side // config.vision_config.patch_size
  assert c == config.mask_decoder_config.hidden_size == config.vision_config.output_channels
  assert sam_lib.low_res_size(config) == 4 * s


def test_tiny_encoder_output_shape(bundle):
  side = sam_lib.image_size(bundle.config)
  px = np.random.default_rng(0).normal(size=(2, 3, side, side)).astype(np.float32)
  emb = bundle.encoder_fn()(tf.constant(px)).numpy()
  assert emb.shape == (2,) + sam_lib.embedding_shape(bundle.config)
  assert np.isfinite(emb).all() and emb.std() > 0


def test_save_pretrained_round_trip(bundle, tmp_path, offline):
  del offline
  folder = tmp_path / "model"
  bundle.sam.save_pretrained(str(folder))
  loaded = build.load_sam(str(folder))
  assert loaded.name == str(folder)
  assert loaded.fingerprint == bundle.fingerprint
  src, dst = _by_name(bundle.sam), _by_name(loaded.sam)
  assert set(src) == set(dst)
  for name, value in src.items():
    np.testing.assert_array_equal(dst[name], value, err_msg=name)
  inputs = _inputs(bundle.config, seed=5)
  for mode in ("box", "points"):
    a = build.build_prompt_mask_decoder(bundle, prompt=mode)(inputs)
    b = build.build_prompt_mask_decoder(loaded, prompt=mode)(inputs)
    np.testing.assert_array_equal(a["masks"].numpy(), b["masks"].numpy())
    np.testing.assert_array_equal(a["iou"].numpy(), b["iou"].numpy())
  assert loaded.processor.to_dict() == bundle.processor.to_dict()


def _assert_model_error(excinfo, name):
  msg = str(excinfo.value)
  assert isinstance(excinfo.value, errors.ModelError)
  assert isinstance(excinfo.value, errors.UserError)
  assert "\n" not in msg, msg
  assert name in msg, msg


@pytest.mark.parametrize("name", ["no-such-model-xyz", "someone/no-such-sam-model"])
def test_unknown_hub_name(offline, name):
  del offline
  with pytest.raises(errors.ModelError) as e:
    build.load_sam(name)
  _assert_model_error(e, name)


@pytest.mark.parametrize("name,suggestion", [
    ("mobilesam", "mobile_sam"), ("Mobile-SAM", "mobile_sam"), ("tinny", "tiny"),
    ("facebook/sam-vit-bas", None), ("sam_vit_base", "facebook/sam-vit-base"),
    ("zzzz", None)])
def test_unknown_name_suggests_nearest_and_never_asks_hub(name, suggestion, monkeypatch):
  asked = []
  monkeypatch.setattr(build, "_hub_reachable", lambda: True)
  monkeypatch.setattr(build.TFSamModel, "from_pretrained",
                      lambda *a, **k: asked.append(a) or (_ for _ in ()).throw(OSError("offline")))
  with pytest.raises(errors.ModelError) as e:
    build.load_sam(name)
  _assert_model_error(e, name)
  msg = str(e.value)
  if "/" in name:  # Shaped like a hub id: asked once, one line.
    assert len(asked) == 1 and "cannot load it" in msg
    return
  assert not asked, "a name that is not an org/name id must not go to the hub"
  assert f"--model {name}: not found" in msg
  if suggestion:
    assert f"did you mean --model {suggestion}?" in msg
  else:
    assert "did you mean" not in msg


def test_an_unreachable_hub_is_one_line_without_asking_it(monkeypatch, tmp_path):
  """Offline, huggingface_hub would retry every file for about 30 s before failing."""
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://127.0.0.1:9")  # Closed.
  monkeypatch.setattr(build.TFSamModel, "from_pretrained",
                      lambda *a, **k: pytest.fail("the hub was asked"))
  with pytest.raises(errors.ModelError) as e:
    build.load_sam("someone/some-sam")
  assert str(e.value) == (
      "--model someone/some-sam: the Hugging Face Hub (https://127.0.0.1:9) cannot be reached "
      "and the model is not in its cache; offline, pass a local directory written by "
      "save_pretrained (e.g. a run's model/) or --model mobile_sam")


def test_a_folder_without_tensorflow_weights_says_what_to_pass(tmp_path):
  folder = tmp_path / "pt_only"
  folder.mkdir()
  (folder / "config.json").write_text("{}")
  (folder / "model.safetensors").write_bytes(b"x")
  with pytest.raises(errors.ModelError) as e:
    build.load_sam(str(folder))
  assert str(e.value) == (
      f"--model {folder}: no TensorFlow weights (tf_model.h5) in that directory, only PyTorch "
      "ones (model.safetensors); this project reads TensorFlow weights: pass a directory this "
      "project wrote (a run's model/), --model mobile_sam, or a hub id such as "
      "facebook/sam-vit-base")


def test_a_file_is_not_a_model(tmp_path):
  path = tmp_path / "model.h5"
  path.write_bytes(b"x")
  with pytest.raises(errors.ModelError, match="is a file, not a model directory"):
    build.load_sam(str(path))


def test_tiny_says_it_is_random(caplog):
  with caplog.at_level(logging.WARNING, logger="tff_sam.models"):
    build.load_sam("tiny")
  assert any("RANDOM weights" in r.getMessage() and "mobile_sam" in r.getMessage()
             for r in caplog.records)


def test_nonexistent_dir(tmp_path, offline):
  del offline
  name = str(tmp_path / "does" / "not" / "exist")
  with pytest.raises(errors.ModelError) as e:
    build.load_sam(name)
  _assert_model_error(e, name)


def test_dir_without_config(tmp_path, offline):
  del offline
  folder = tmp_path / "empty_model"
  folder.mkdir()
  (folder / "tf_model.h5").write_bytes(b"")
  with pytest.raises(errors.ModelError) as e:
    build.load_sam(str(folder))
  _assert_model_error(e, str(folder))
  assert "config.json" in str(e.value)


def test_dir_with_config_but_no_weights(bundle, tmp_path, offline):
  del offline
  folder = tmp_path / "no_weights"
  bundle.sam.config.save_pretrained(str(folder))
  with pytest.raises(errors.ModelError) as e:
    build.load_sam(str(folder))
  _assert_model_error(e, str(folder))


def test_dir_with_corrupt_config(tmp_path, offline):
  del offline
  folder = tmp_path / "bad_config"
  folder.mkdir()
  (folder / "config.json").write_text("{not json")
  with pytest.raises(errors.ModelError) as e:
    build.load_sam(str(folder))
  _assert_model_error(e, str(folder))
