"""Online mode (`--noembedding_cache`): images in the records, the encoder in the model.

The online pipeline must reproduce `SamImageProcessor`'s pixel values and the cached
mode's results (which differ only by the float16 rounding of cached embeddings). The
model TFF builds must list its weights in the eager model's order (MobileSAM's TinyViT
included), so the initial state takes the pretrained weights.
"""

import collections
import csv
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_sam import config as config_lib
from tff_sam.data import cache
from tff_sam.data import discovery
from tff_sam.data import pipeline
from tff_sam.data import preprocess
from tff_sam.data import reading
from tff_sam.data import synthetic
from tff_sam.federated.backends import execution
from tff_sam.federated.learning import processes
from tff_sam.federated.learning import tasks
from tff_sam.federated.program import program
from tff_sam.models import build
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import encoders
from tff_sam.models import mobile_sam
from tff_sam.models import online as online_lib
from tff_sam.models import sam as sam_lib

from conftest import cache_clients

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.mark.parametrize("shape", [(50, 37, 3), (37, 50, 3), (64, 64, 3)])
def test_tf_pixel_values_equal_the_processor(bundle, shape):
  rng = np.random.default_rng(sum(shape))
  image = rng.integers(0, 256, size=shape, dtype=np.uint8)
  side = sam_lib.image_size(bundle.config)
  want = bundle.processor(images=image, return_tensors="np")["pixel_values"][0]
  resized = preprocess.resized_image(bundle.processor, image)
  assert resized.dtype == np.uint8 and max(resized.shape[:2]) == side
  got = preprocess.pixel_values_tf(
      tf.constant(resized), preprocess.pixel_normalization(bundle.processor), side).numpy()
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_image_records_round_trip(bundle, tmp_path):
  root = synthetic.generate(tmp_path / "d", images_per_site=1, test_per_site=0, seed=5)
  examples = discovery.list_examples(root / "site_0")
  cached, _ = cache.build_records(examples, bundle=bundle, cache_root=tmp_path / "c",
                                       binary_components=False, batch_size=2,
                                       show_progress=False)
  online, stats = cache.build_records(
      examples, bundle=bundle, cache_root=tmp_path / "c", binary_components=False,
      batch_size=2, show_progress=False, online=True)
  assert stats.encoded == 1 and online[0].path != cached[0].path
  cfg = bundle.config
  side = sam_lib.image_size(cfg)
  raw = next(iter(tf.data.TFRecordDataset(str(online[0].path))))
  rec = cache.parse_record(raw, embedding_shape=sam_lib.embedding_shape(cfg),
                                input_size=side,
                                normalization=preprocess.pixel_normalization(bundle.processor))
  image, labels = reading.load_example(examples[0])
  want = preprocess.preprocess(bundle.processor, image, labels, input_size=side)
  np.testing.assert_allclose(rec["pixel_values"].numpy(), want.pixel_values, atol=1e-5)
  ref = cache.read_record(cached[0].path, embedding_shape=sam_lib.embedding_shape(cfg),
                               input_size=side)
  for key in ("labels", "object_ids", "boxes", "original_size", "reshaped_size"):
    np.testing.assert_array_equal(rec[key].numpy(), ref[key])
  # The encoder on these pixels gives the cached embedding (float16-rounded there).
  emb = bundle.encoder_fn()(rec["pixel_values"][None]).numpy()[0]
  np.testing.assert_allclose(emb, ref["embedding"], atol=2e-3 * np.abs(emb).max())


def test_online_model_equals_decoder_on_encoder_output(bundle):
  online = build.build_online_model(bundle, prompt="box")
  decoder = build.build_prompt_mask_decoder(bundle, prompt="box")
  side = sam_lib.image_size(bundle.config)
  px = tf.random.stateless_normal((2, 3, side, side), seed=[3, 4])
  boxes = tf.constant([[[2.0, 3.0, 30.0, 41.0]], [[10.0, 12.0, 50.0, 40.0]]])
  got = online({"pixel_values": px, "boxes": boxes})
  want = decoder({"image_embeddings": bundle.encoder_fn()(px), "boxes": boxes})
  np.testing.assert_allclose(got["masks"].numpy(), want["masks"].numpy(), atol=1e-4)
  # Only the decoder trains; the encoder's weights are non-trainable.
  assert ({id(w) for w in online.trainable_weights}
          == {id(w) for w in online.decoder.trainable_weights})
  assert len(online.non_trainable_weights) == (len(online.image_encoder.weights)
                                               + len(online.decoder.non_trainable_weights))


@pytest.mark.slow
def test_online_mode_matches_cached_mode(tmp_path, reference_run, reference_settings):
  """One online round against rounds 0-1 of the (cached) reference run, same settings."""
  config = config_lib.RunConfig(
      output_dir=str(tmp_path / "online"), **{**reference_settings, "rounds": 1},
      embedding_cache=False).validate()
  summary = program.run_experiment(config, log=lambda _: None)
  assert summary["config"]["embedding_cache"] is False
  with open(Path(config.output_dir) / "metrics.csv") as f:
    online = list(csv.DictReader(f))
  with open(reference_run.out / "metrics.csv") as f:
    cached = list(csv.DictReader(f))
  assert reference_run.config.embedding_cache is True
  assert [r["round"] for r in online] == ["0", "1"]
  # Round 0: same weights, central evaluation from the same embedding cache.
  assert online[0]["test_dice"] == cached[0]["test_dice"]
  # Round 1: the only difference is float16 (cached) vs float32 (online) embeddings.
  assert float(online[1]["train_loss"]) == pytest.approx(float(cached[1]["train_loss"]),
                                                         rel=1e-4)
  for key in ("test_dice", "test_iou", "fed_eval_dice"):
    assert float(online[1][key]) == pytest.approx(float(cached[1][key]), abs=2e-3), key


def _weight_names(model) -> tuple[list[str], list[str]]:
  """(trainable, non-trainable) weight names of an `OnlineSamModel`, in Keras' order.

  Encoder weights go by their name inside the encoder (TinyViT: MobileSAM's state-dict
  key), the others by variable name: a graph uniquifies repeated names, eager does not.
  """
  encoder = encoders.weight_names(model.image_encoder, model.encoder_kind)
  return tuple([encoder.get(id(w), w.name) for w in weights]
               for weights in (model.trainable_weights, model.non_trainable_weights))


def _shapes(weights) -> list[tuple[int, ...]]:
  return [tuple(w.shape) for w in weights]


@pytest.mark.parametrize("encoder", [sam_lib.TINYVIT_ENCODER, sam_lib.VIT_ENCODER])
def test_tff_model_lists_weights_in_the_eager_order(encoder):
  """TFF builds the model in a legacy graph, where Keras makes v1 layers: their
  `trainable = False` did not reach TinyViT's stages and blocks (held in lists), which
  stayed trainable and put the frozen encoder's non-trainable weights in another order
  than the eager model's (the initial state then failed to take the pretrained weights).
  """
  config = mobile_sam.mobile_sam_config()
  eager = online_lib.OnlineSamModel(config, encoder=encoder)
  side = sam_lib.image_size(config)
  input_spec = collections.OrderedDict(
      x=collections.OrderedDict(pixel_values=tf.TensorSpec([None, 3, side, side], tf.float32)),
      y=tf.TensorSpec([None, 1, side, side], tf.float32))
  model_fn = processes.build_model_fn(sam_config=config, input_spec=input_spec, prompt="box",
                                      loss="dice_ce", train_iou_head=True,
                                      online_encoder=encoder)
  with tf.Graph().as_default():
    graph = online_lib.OnlineSamModel(config, encoder=encoder)
    assert _weight_names(graph) == _weight_names(eager)
    tff_weights = tff.learning.models.ModelWeights.from_model(model_fn())
  assert _shapes(tff_weights.trainable) == _shapes(eager.trainable_weights)
  assert _shapes(tff_weights.non_trainable) == _shapes(eager.non_trainable_weights)
  assert not any(layer.trainable for layer in graph.image_encoder.submodules
                 if isinstance(layer, tf.keras.layers.Layer))


@pytest.fixture(name="mobile_bundle", scope="module")
def _mobile_bundle():
  """MobileSAM's real weights (module scope: set up before, so outside of, a test's
  `isolated_cache`: the converted weights come from the user's cache)."""
  return build.load_sam(config_lib.MOBILE_SAM_MODEL)


def _max_change(before, after) -> float:
  return max(float(np.max(np.abs(a - b))) for a, b in zip(before, after, strict=True))


@pytest.mark.slow
def test_online_mobile_sam_round(mobile_bundle, reference_data, tmp_path):
  """The initial state holds MobileSAM's weights, each in its own variable (the encoder's
  checked by name), and one round under `tf` execution trains the decoder only."""
  cache_clients(reference_data, ("site_0",), bundle=mobile_bundle, tmp=tmp_path, online=True)
  config = config_lib.RunConfig(
      output_dir=str(tmp_path / "out"), model=config_lib.MOBILE_SAM_MODEL,
      embedding_cache=False, prompts_per_image=2, batch_size=2, seed=0)
  with tff.framework.get_context_stack().install(
      execution.build_context(config_lib.TF_EXECUTION)):
    task = tasks.build_task(config=config, bundle=mobile_bundle, client_ids=["site_0"],
                            manifest_dir=tmp_path / "clients")
    result = task.training_process.next(task.initial_state,
                                        [pipeline.round_client_id("site_0", 1)])
    trainable, non_trainable = processes.weights_from_state(task.training_process,
                                                            task.initial_state)
    after, after_non_trainable = processes.weights_from_state(task.training_process,
                                                              result.state)
    execution.release_computations()
  want_trainable, want_non_trainable = decoder_lib.model_weights_lists(task.model)
  assert _max_change(trainable, want_trainable) == 0.0
  assert _max_change(non_trainable, want_non_trainable) == 0.0
  names = encoders.weight_names(task.model.image_encoder, sam_lib.TINYVIT_ENCODER)
  pretrained = {n: v.numpy() for n, v, _ in mobile_bundle.image_encoder.torch_params()}
  in_state = {names[id(w)]: value for w, value in zip(task.model.non_trainable_weights,
                                                      non_trainable) if id(w) in names}
  assert in_state.keys() == pretrained.keys()
  assert _max_change([in_state[n] for n in pretrained], pretrained.values()) == 0.0
  train = result.metrics["client_work"]["train"]
  assert train["num_examples"] == 2 and np.isfinite(train["loss"])
  assert _max_change(after, trainable) > 0.1 * config.client_lr  # The decoder moved,
  assert _max_change(after_non_trainable, non_trainable) == 0.0  # the encoder did not.
