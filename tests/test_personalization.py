"""Personalization (`--personalize_steps`): sites matched to their held-out clients, the
local fine-tuning, and a tiny run whose personalized models are exported and scored."""

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam.data import cache
from tff_sam.evaluation import heldout
from tff_sam.federated.learning import processes
from tff_sam.federated.program import personalization
from tff_sam.federated.program import program
from tff_sam.federated.program import run_data
from tff_sam.models import build
from tff_sam.models import losses
from tff_sam.models import sam as sam_lib

SITES = ("site_0", "site_1", "site_2")


def _config(**settings) -> config_lib.RunConfig:
  return config_lib.RunConfig(output_dir="x", personalize_steps=2, **settings).validate()


def test_sites_meet_their_held_out_clients_declared_then_by_data_then_by_name():
  match = personalization.site_test_clients
  assert match(_config(data="synthetic"), sites=["a", "b"], test_clients=["a", "t"]) == {"a": "a"}
  assert match(_config(data="synthetic", site_test_clients=("b:t", "a:t")), sites=["a", "b"],
               test_clients=["a", "t"]) == {"a": "t", "b": "t"}
  # The sample data's own map: its HeLa sites are scored on held-out HeLa frames.
  assert match(_config(), sites=["hela_1", "hela_2", "hela_3", "bacteria"],
               test_clients=["bacteria", "hela"]) == {
                   "hela_1": "hela", "hela_2": "hela", "hela_3": "hela", "bacteria": "bacteria"}
  with pytest.raises(errors.ConfigError, match="^--site_test_clients: names 'c', not a "
                     "training site of this run \\(a, b\\)$"):
    match(_config(site_test_clients=("c:t",)), sites=["a", "b"], test_clients=["t"])
  with pytest.raises(errors.ConfigError, match="names 'u', not a held-out client"):
    match(_config(site_test_clients=("a:u",)), sites=["a", "b"], test_clients=["t"])


@pytest.mark.parametrize("settings, message", [
    (dict(site_test_clients=("a:t",)), "^--site_test_clients: is set but nothing is "
     "personalized"),
    (dict(personalize_steps=2, site_test_clients=("a",)), "^--site_test_clients: entries are "
     "site:client"),
    (dict(personalize_steps=2, site_test_clients=("a:t", "a:u")), "^--site_test_clients: "
     "lists a more than once$"),
    (dict(personalize_steps=2, adapter="lora"), "^--personalize_steps: personalizes the mask "
     "decoder on cached embeddings"),
    (dict(personalize_steps=-1), "^--personalize_steps: must be >= 0"),
])
def test_personalization_settings_are_checked(settings, message):
  with pytest.raises(errors.ConfigError, match=message):
    config_lib.RunConfig(output_dir="x", **settings).validate()


def test_fine_tune_trains_the_decoder_only_and_lowers_the_loss(bundle):
  model = build.build_prompt_mask_decoder(bundle)
  frozen = [w.numpy() for w in model.non_trainable_weights]
  rng = np.random.default_rng(0)
  low = sam_lib.low_res_size(bundle.config)
  target = np.zeros((1, 2, low, low), np.float32)
  target[0, :, 4:12, 4:12] = 1.0
  batch = {"x": {"image_embeddings": rng.normal(size=(1,) + sam_lib.embedding_shape(
                     bundle.config)).astype(np.float32),
                 "boxes": np.array([[[8, 8, 48, 48], [8, 8, 48, 48]]], np.float32),
                 "points": np.zeros((1, 2, 1, 2), np.float32),
                 "point_labels": -np.ones((1, 2, 1), np.int32)},
           "y": target}
  source = build.build_prompt_mask_decoder(bundle)
  tuner = personalization.FineTuner(
      model=model, optimizer=processes.build_optimizer("adam", 1e-3), loss_fn=losses.MaskLoss())
  trace = tuner.train(tf.data.Dataset.from_tensors(batch), steps=20)
  assert len(trace) == 20 and trace[-1] < 0.9 * trace[0]
  for before, after in zip(frozen, model.non_trainable_weights):
    np.testing.assert_array_equal(before, after.numpy())
  # The next site starts from the source model with a fresh optimizer: the same losses.
  tuner.reset(source)
  assert tuner.train(tf.data.Dataset.from_tensors(batch), steps=20) == pytest.approx(
      trace, rel=1e-5)


@pytest.mark.slow
def test_personalized_models_are_exported_and_scored_on_their_own_sites(tmp_path,
                                                                       reference_settings):
  """Each reference site has its own held-out client (`test/<site>/`): matched by name.
  The global model is left as it was; each site's export reproduces its score."""
  out = tmp_path / "run"
  config = config_lib.RunConfig(output_dir=str(out), **{**reference_settings, "rounds": 1},
                                personalize_steps=4).validate()
  lines = []
  summary = program.run_experiment(config, log=lines.append)
  personalized = summary["personalized"]
  assert personalized["steps"] == 4 and list(personalized["sites"]) == list(SITES)
  global_by_client = summary["evaluation"]["by_prompt"]["box"]["by_client"]
  for site, entry in personalized["sites"].items():
    assert entry["test_client"] == site
    assert entry["by_prompt"]["box"]["global"] == global_by_client[site]
  assert sum(line.startswith("  personalized site_") for line in lines) == 3
  assert json.loads((out / "summary.json").read_text())["personalized"] == personalized

  splits = run_data.prepare_data(config, Path(config.cache_dir))
  clients = [c for c, exs in splits.test_clients.items() for _ in exs]

  def score(model_dir: Path, client: str) -> float:
    bundle = build.load_sam(str(model_dir))
    records, _ = cache.build_records(list(splits.test), bundle=bundle,
                                     cache_root=Path(config.cache_dir), binary_components=False,
                                     batch_size=4, show_progress=False)
    evaluator = heldout.Evaluator(examples=list(splits.test), records=records, bundle=bundle,
                                  clients=clients)
    return evaluator(build.build_prompt_mask_decoder(bundle), eval_prompt="box",
                     client=client).dice

  # The global export is the global model (personalization trained copies only).
  assert score(out / "model", "site_1") == pytest.approx(global_by_client["site_1"]["dice"],
                                                         abs=1e-9)
  site_dir = out / personalization.PERSONALIZED_DIR / "site_1"
  assert score(site_dir, "site_1") == pytest.approx(
      personalized["sites"]["site_1"]["by_prompt"]["box"]["personalized"]["dice"], abs=1e-9)
  mine, shared = build.load_sam(str(site_dir)).sam, build.load_sam(str(out / "model")).sam
  assert any(not np.array_equal(a.numpy(), b.numpy())
             for a, b in zip(mine.mask_decoder.weights, shared.mask_decoder.weights))
  for a, b in zip(mine.vision_encoder.weights, shared.vision_encoder.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_wrong_site_test_client_is_one_line_before_round_0(tmp_path, reference_settings):
  config = config_lib.RunConfig(output_dir=str(tmp_path / "run"), **reference_settings,
                                personalize_steps=2, site_test_clients=("site_0:hela",)
                                ).validate()
  with pytest.raises(errors.ConfigError, match="^--site_test_clients: names 'hela', not a "
                     "held-out client of this run \\(site_0, site_1, site_2\\)$"):
    program.run_experiment(config, log=lambda _: None)
  assert not (tmp_path / "run" / "metrics.csv").exists()  # No round ran.
