"""Online mode (`--noembedding_cache`): images in the records, the encoder in the model.

The online pipeline must reproduce `SamImageProcessor`'s pixel values and the cached
mode's results (which differ only by the float16 rounding of cached embeddings).
"""

import csv
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam.data import cache
from tff_sam.data import discovery
from tff_sam.data import preprocess
from tff_sam.data import reading
from tff_sam.data import synthetic
from tff_sam.federated import program
from tff_sam.models import build
from tff_sam.models import sam as sam_lib

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
