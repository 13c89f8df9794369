"""`--adapter=lora`: LoRA in the image encoder, trained and sent with the mask decoder.

Model level (tiny configs, both encoders): the adapted model at its initial weights
computes exactly what the frozen model does; only adapters and decoder are model
weights; merged weights (exported) predict what the adapters do; the site copy of the
base weights; the feature cache. Program level (the tiny reference settings): a round
changes only adapters and decoder, sends what the decoder does plus the adapters,
resumes, exports a merged model every loader reads, and refuses bad flags in one line.
"""

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig, TFSamModel  # pylint: disable=g-multiple-import

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam.bench import communication
from tff_sam.data import cache
from tff_sam.data import discovery
from tff_sam.data import synthetic
from tff_sam.export import pretrained
from tff_sam.federated.learning import processes
from tff_sam.federated.program import program
from tff_sam.federated.program import run_folder
from tff_sam.models import adapted
from tff_sam.models import build
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import encoders
from tff_sam.models import lora
from tff_sam.models import sam as sam_lib
from tff_sam.models import tinyvit

from conftest import flagfile_config

SPEC = lora.LoraSpec(rank=2, alpha=4.0, targets=("qkv", "proj", "mlp"))


@pytest.fixture(name="tinyvit_bundle", scope="module")
def _tinyvit_bundle():
  """A MobileSAM-shaped bundle at 64 pixels: TinyViT (random, seeded) + a small
  256-channel prompt encoder and decoder."""
  config = SamConfig(
      vision_config=SamVisionConfig(hidden_size=32, mlp_dim=32, num_hidden_layers=1,
                                    num_attention_heads=1, global_attn_indexes=[],
                                    use_abs_pos=False, use_rel_pos=False, image_size=64,
                                    patch_size=16, output_channels=256, num_pos_feats=128
                                    ).to_dict(),
      prompt_encoder_config=SamPromptEncoderConfig(image_size=64, patch_size=16).to_dict(),
      mask_decoder_config=SamMaskDecoderConfig(mlp_dim=64, num_hidden_layers=1,
                                               iou_head_hidden_dim=32).to_dict())
  sam = TFSamModel(config)
  sam.build_in_name_scope()
  encoder = tinyvit.build_tinyvit(64)
  rng = np.random.default_rng(7)
  for w in encoder.weights:
    if "running_var" not in w.name:
      w.assign(rng.normal(0, 0.2, w.shape).astype(np.float32))
  return sam_lib.SamBundle(name="tiny-tinyvit", sam=sam, fingerprint="tinytinyvit",
                           processor=sam_lib.build_image_processor(config),
                           image_encoder=encoder)


@pytest.fixture(name="bundles", scope="module")
def _bundles(bundle, tinyvit_bundle):
  return {sam_lib.VIT_ENCODER: bundle, sam_lib.TINYVIT_ENCODER: tinyvit_bundle}


def _inputs(bundle, batch: int = 2):
  side = sam_lib.image_size(bundle.config)
  px = tf.random.stateless_normal((batch, 3, side, side), seed=[3, 4])
  boxes = tf.constant([[[2.0, 3.0, side / 2, side * 0.6]]] * batch)
  return px, boxes


def _frozen_masks(bundle, px, boxes) -> np.ndarray:
  """The frozen model's masks, the encoder run by the same code path as the adapted."""
  embeddings = encoders.embed(encoders.bundle_encoder(bundle), sam_lib.encoder_kind(bundle), px)
  decoder = build.build_prompt_mask_decoder(bundle, prompt="box")
  return decoder({"image_embeddings": embeddings, "boxes": boxes})["masks"].numpy()


def _perturb(adapters, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  for a in adapters:
    b = a.layer.lora_b
    b.assign(rng.normal(0, 0.3, b.shape).astype(np.float32))


@pytest.mark.parametrize("kind", [sam_lib.VIT_ENCODER, sam_lib.TINYVIT_ENCODER])
def test_initial_adapted_model_is_exactly_the_frozen_model(kind, bundles, tmp_path):
  bundle = bundles[kind]
  site = adapted.write_site_weights(bundle, cache_root=tmp_path)
  px, boxes = _inputs(bundle)
  want = _frozen_masks(bundle, px, boxes)
  start = encoders.first_block_stage(kind)
  for model_start in (None, start):
    model = build.build_adapted_model(bundle, site=site, lora=SPEC, start=model_start,
                                      prompt="box")
    assert model.adapters and all(
        not a.layer.lora_b.numpy().any() and a.layer.lora_a.numpy().any() for a in model.adapters)
    x = ({"pixel_values": px} if model_start is None else
         {"features": encoders.features(encoders.bundle_encoder(bundle), kind, px, start=start)})
    got = model({**x, "boxes": boxes})["masks"].numpy()
    np.testing.assert_array_equal(got, want)  # B = 0: exactly, not approximately.
  # The split encoder is the whole encoder.
  np.testing.assert_allclose(
      encoders.embed(encoders.bundle_encoder(bundle), kind, px).numpy(),
      bundle.encoder_fn()(px).numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", [sam_lib.VIT_ENCODER, sam_lib.TINYVIT_ENCODER])
def test_model_weights_are_adapters_and_decoder_only(kind, bundles, tmp_path):
  bundle = bundles[kind]
  site = adapted.write_site_weights(bundle, cache_root=tmp_path)
  model = build.build_adapted_model(bundle, site=site, lora=SPEC, start=None)
  adapter_vars = {id(v) for a in model.adapters for v in (a.layer.lora_a, a.layer.lora_b)}
  decoder = model.decoder
  assert ({id(w) for w in model.trainable_weights}
          == adapter_vars | {id(w) for w in decoder.trainable_weights})
  assert ({id(w) for w in model.non_trainable_weights}
          == {id(w) for w in decoder.non_trainable_weights})
  n_blocks = (sum(len(s.blocks) for s in model.image_encoder.stages[1:])
              if kind == sam_lib.TINYVIT_ENCODER else len(model.image_encoder.layers))
  assert len(model.adapters) == 4 * n_blocks  # qkv, proj, fc1/lin1, fc2/lin2.
  # The base weights are variables of the encoder, outside the model weights.
  base = {id(w): w for w in model.image_encoder.weights if id(w) not in adapter_vars}
  assert len(base) == len(site.names) and not any(w.trainable for w in base.values())
  # Gradients reach the adapters (B first: A's gradient is 0 while B is 0).
  px, boxes = _inputs(bundle, batch=1)
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean(model({"pixel_values": px, "boxes": boxes})["masks"] ** 2)
  grads = tape.gradient(loss, [a.layer.lora_b for a in model.adapters])
  assert all(g is not None and np.abs(g.numpy()).max() > 0 for g in grads)


@pytest.mark.parametrize("kind", [sam_lib.VIT_ENCODER, sam_lib.TINYVIT_ENCODER])
def test_merged_and_saved_adapters_predict_what_the_adapters_do(kind, bundles, tmp_path):
  bundle = bundles[kind]
  site = adapted.write_site_weights(bundle, cache_root=tmp_path)
  model = build.build_adapted_model(bundle, site=site, lora=SPEC, start=None, prompt="box")
  _perturb(model.adapters)
  px, boxes = _inputs(bundle)
  unmerged = model({"pixel_values": px, "boxes": boxes})["masks"].numpy()
  assert np.abs(unmerged - _frozen_masks(bundle, px, boxes)).max() > 1e-2  # LoRA acts.
  merged = build.merged_bundle(bundle, lora.merged_deltas(model.adapters))
  decoder = build.build_prompt_mask_decoder(merged, prompt="box")
  decoder_lib.copy_prompt_decoder_weights(model.decoder, decoder)
  got = decoder({"image_embeddings": merged.encoder_fn()(px), "boxes": boxes})["masks"].numpy()
  np.testing.assert_allclose(got, unmerged, atol=1e-5 * max(1.0, np.abs(unmerged).max()))
  assert merged.fingerprint != bundle.fingerprint
  # The bundle itself is unchanged.
  np.testing.assert_array_equal(_frozen_masks(bundle, px, boxes),
                                _frozen_masks(bundle, px, boxes))
  # The adapters alone, saved and loaded, merge into the same model.
  lora.save_adapter(tmp_path / "adapter", model.adapters, spec=SPEC, image_encoder=kind,
                    base_model=bundle.name)
  loaded = lora.load_adapter(tmp_path / "adapter")
  assert loaded.spec == SPEC and loaded.image_encoder == kind
  again = build.merged_bundle(bundle, loaded.deltas())
  for a, b in zip(encoders.bundle_encoder(again).weights, encoders.bundle_encoder(merged).weights):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
  with pytest.raises(errors.ModelError, match="matches no weight"):
    build.merged_bundle(bundle, {"layers.9.nothing": np.zeros((2, 2), np.float32)})


def test_adapter_files_errors(tmp_path):
  with pytest.raises(errors.ModelError, match="cannot read a LoRA adapter"):
    lora.load_adapter(tmp_path)
  (tmp_path / lora.ADAPTER_CONFIG).write_text(json.dumps({"adapter": "lora", "format_version": 1}))
  np.savez(tmp_path / lora.ADAPTER_WEIGHTS, **{"x.lora_A": np.zeros((3, 2), np.float32)})
  with pytest.raises(errors.ModelError, match="lacks a matching lora_A/lora_B"):
    lora.load_adapter(tmp_path)


def test_site_copy_is_written_once_checked_and_rewritten(bundle, tmp_path):
  site = adapted.write_site_weights(bundle, cache_root=tmp_path)
  path = Path(site.path)
  assert path.stat().st_size == 4 * site.num_values
  assert site.num_values == sum(int(np.prod(w.shape)) for w in bundle.sam.vision_encoder.weights)
  stamp = path.stat().st_mtime_ns
  assert adapted.write_site_weights(bundle, cache_root=tmp_path) == site
  assert path.stat().st_mtime_ns == stamp  # Reused, not rewritten.
  data = bytearray(path.read_bytes())
  data[100] ^= 0xFF  # Corrupted: the checksum catches it and the copy is written again.
  path.write_bytes(bytes(data))
  adapted.write_site_weights(bundle, cache_root=tmp_path)
  assert path.read_bytes() != bytes(data)
  # A layout that does not fit the encoder is refused while the model is built.
  wrong = dataclasses.replace(site, shapes=site.shapes[:-1] + ((7,),))
  with pytest.raises(ValueError, match="has shape"):
    adapted.AdaptedSamModel(bundle.config, encoder=sam_lib.VIT_ENCODER, lora=SPEC, site=wrong,
                            start=None)


def test_feature_records_hold_the_encoder_activations(bundle, tmp_path):
  root = synthetic.generate(tmp_path / "d", images_per_site=1, test_per_site=0, seed=5)
  examples = discovery.list_examples(root / "site_0")
  embedded, _ = cache.build_records(examples, bundle=bundle, cache_root=tmp_path / "c",
                                    binary_components=False, batch_size=2, show_progress=False)
  featured, stats = cache.build_records(examples, bundle=bundle, cache_root=tmp_path / "c",
                                        binary_components=False, batch_size=2,
                                        show_progress=False, feature_start=1)
  assert stats.encoded == 1 and featured[0].path != embedded[0].path
  shape = encoders.cut_shape(sam_lib.VIT_ENCODER, bundle.config, start=1)
  side = sam_lib.image_size(bundle.config)
  rec = cache.read_record(featured[0].path, embedding_shape=sam_lib.embedding_shape(bundle.config),
                          input_size=side, feature_shape=shape)
  ref = cache.read_record(embedded[0].path, embedding_shape=sam_lib.embedding_shape(bundle.config),
                          input_size=side)
  # The rest of the encoder on the cached features gives the cached embedding.
  emb = encoders.from_features(bundle.sam.vision_encoder, sam_lib.VIT_ENCODER,
                               tf.constant(rec["features"][None]), start=1).numpy()[0]
  np.testing.assert_allclose(emb, ref["embedding"], atol=5e-3 * np.abs(emb).max())
  for key in ("labels", "object_ids", "boxes"):
    np.testing.assert_array_equal(rec[key], ref[key])


def test_adapter_flags_are_validated_naming_the_flag():
  base = dict(output_dir="x")
  for settings, match in (
      (dict(lora_rank=8), "^--lora_rank: is set but there is no adapter"),
      (dict(lora_targets=("mlp",)), "^--lora_targets: is set but there is no adapter"),
      (dict(adapter="dora"), "^--adapter: must be one of"),
      (dict(adapter="lora", lora_rank=0), "^--lora_rank: must be >= 1"),
      (dict(adapter="lora", lora_alpha=-1.0), "^--lora_alpha: must be > 0"),
      (dict(adapter="lora", lora_targets=("qkv", "ffn")), "^--lora_targets: must list"),
      (dict(adapter="lora", lora_targets=("qkv", "qkv")), "^--lora_targets: lists qkv more than once"),
      (dict(adapter="lora", lora_targets=()), "^--lora_targets: must list at least one")):
    with pytest.raises(errors.ConfigError, match=match):
      config_lib.RunConfig(**base, **settings).validate()
  config_lib.RunConfig(**base, adapter="lora", lora_rank=8, lora_targets=("qkv", "mlp")).validate()


def test_cli_adapter_mistake_is_one_line(tmp_path, reference_data, reference_cache, run_binary):
  result = run_binary("run", f"--output_dir={tmp_path / 'o'}", f"--cache_dir={reference_cache}",
                      f"--data_dir={reference_data}", "--model=tiny", "--rounds=1",
                      "--lora_targets=qkv,attention", "--adapter=lora")
  assert result.code == 1 and "Traceback" not in result.stderr
  assert result.error_lines() == [
      "error: --lora_targets: must list targets of ('qkv', 'proj', 'mlp'), got 'attention'"]


# ---------------------------------------------------------------- whole runs (tiny)


def _metrics(out: Path) -> list[dict]:
  with open(out / "metrics.csv") as f:
    return list(csv.DictReader(f))


@pytest.fixture(name="lora_run", scope="module")
def _lora_run(tmp_path_factory, reference_settings):
  """A 2-round LoRA run of the reference settings (feature cache), in this process."""
  out = tmp_path_factory.mktemp("lora") / "run"
  config = config_lib.RunConfig(
      output_dir=str(out), **{**reference_settings, "rounds": 2}, adapter="lora",
      lora_targets=("qkv", "mlp")).validate()
  lines = []
  summary = program.run_experiment(config, log=lines.append)
  return config, out, summary, lines


def test_lora_run_trains_adapters_and_decoder_and_sends_little_more(lora_run, bundle,
                                                                    reference_data):
  config, out, summary, lines = lora_run
  assert any("encoder features (the ViT's patch embeddings" in line for line in lines)
  assert any(line.startswith("adapter: LoRA rank 4") and "stay on the sites" in line for line in lines)
  rows = _metrics(out)
  assert [r["round"] for r in rows] == ["0", "1", "2"]
  assert all(float(r["test_dice"]) >= 0 for r in rows)
  assert summary["config"]["adapter"] == "lora"
  # The saved states hold the adapters and the decoder, nothing of the encoder's base.
  from tff_sam.federated.learning import tasks  # pylint: disable=g-import-not-at-top
  site = adapted.write_site_weights(bundle, cache_root=Path(config.cache_dir))
  task = tasks.build_task(config=config, bundle=bundle, client_ids=["site_0", "site_1"],
                          manifest_dir=out / "clients", site_weights=site)
  state = run_folder.state_manager(out)
  import asyncio  # pylint: disable=g-import-not-at-top
  saved = {v: asyncio.run(state.load(v, task.initial_state)) for v in (1, 2)}
  before = processes.weights_from_state(task.training_process, task.initial_state)
  after = processes.weights_from_state(task.training_process, saved[2])
  model = task.model
  assert len(before[0]) == len(model.trainable_weights)
  changed = {id(w) for w, a, b in zip(model.trainable_weights, before[0], after[0])
             if not np.array_equal(a, b)}
  adapter_b = {id(a.layer.lora_b) for a in model.adapters}
  assert adapter_b <= changed  # Every adapter trained...
  decoder_ids = {id(w) for w in model.decoder.trainable_weights}
  assert changed & decoder_ids  # ...and the decoder.
  for a, b in zip(before[1], after[1]):  # The frozen prompt encoder did not change.
    np.testing.assert_array_equal(a, b)
  # Bytes per client and round, from the process's type signatures.
  lora_bytes = communication.communication(task.training_process)
  decoder_task = tasks.build_task(config=dataclasses.replace(
      config, adapter="none", lora_targets=("qkv",)), bundle=bundle,
      client_ids=["site_0"], manifest_dir=out / "clients")
  decoder_bytes = communication.communication(decoder_task.training_process)
  adapter_bytes = 4 * lora.count_parameters(model.adapters)
  assert lora_bytes["upload_update"] == decoder_bytes["upload_update"] + adapter_bytes
  assert lora_bytes["broadcast_model"] == decoder_bytes["broadcast_model"] + adapter_bytes


def test_lora_run_exports_merged_model_every_loader_reads(lora_run, bundle):
  config, out, summary, _ = lora_run
  model_dir = out / "model"
  loaded = lora.load_adapter(model_dir / pretrained.ADAPTER_DIR)
  assert loaded.spec == lora.LoraSpec(rank=4, alpha=4.0, targets=("qkv", "mlp"))
  assert "LoRA adapters in its image encoder" in (model_dir / "README.md").read_text()
  # The merged export equals the base model + the saved adapters + the exported decoder.
  exported = build.load_sam(str(model_dir))
  rebuilt = build.merged_bundle(bundle, loaded.deltas())
  for a, b in zip(exported.sam.vision_encoder.weights, rebuilt.sam.vision_encoder.weights):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
  assert any(not np.allclose(a.numpy(), b.numpy()) for a, b in
             zip(exported.sam.vision_encoder.weights, bundle.sam.vision_encoder.weights))
  # Plain transformers loads it and reproduces the run's final held-out scores (tf).
  plain = TFSamModel.from_pretrained(str(model_dir))
  px, boxes = _inputs(bundle, batch=1)
  np.testing.assert_allclose(plain.get_image_embeddings(px).numpy(),
                             exported.encoder_fn()(px).numpy(), atol=1e-5)
  from tff_sam.evaluation import heldout  # pylint: disable=g-import-not-at-top
  result = heldout.evaluate_folder(model=str(model_dir), data_dir=config.data_dir,
                                   cache_dir=config.cache_dir, eval_prompts=("box",))
  assert result["dice"] == pytest.approx(summary["final"]["dice"], abs=2e-3)


@pytest.mark.slow
def test_lora_resume_equals_uninterrupted(tmp_path, lora_run):
  config, out, summary, _ = lora_run
  short = dataclasses.replace(config, output_dir=str(tmp_path / "resumed"), rounds=1)
  program.run_experiment(short, log=lambda _: None)
  lines = []
  resumed = program.run_experiment(dataclasses.replace(short, rounds=2), log=lines.append)
  assert any(line.startswith("resuming") for line in lines)
  for a, b in zip(_metrics(Path(short.output_dir)), _metrics(out)):
    for key in ("train_loss", "test_dice", "fed_eval_dice"):
      if a[key]:
        assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-6), (a["round"], key)
  assert resumed["final"]["dice"] == pytest.approx(summary["final"]["dice"], abs=1e-6)
  with pytest.raises(errors.ConfigError, match="--lora_rank"):
    program.run_experiment(dataclasses.replace(short, rounds=3, lora_rank=8), log=lambda _: None)


@pytest.mark.slow
def test_lora_online_run_matches_the_feature_cache(tmp_path, lora_run):
  """Online (--noembedding_cache, the whole encoder in the model) vs cached features:
  round 0 the same model; round 1 differs only by the features' float16 rounding."""
  config, out, _, _ = lora_run
  online = dataclasses.replace(config, output_dir=str(tmp_path / "online"), rounds=1,
                               embedding_cache=False)
  lines = []
  program.run_experiment(online, log=lines.append)
  assert any(line.startswith("images (online mode)") for line in lines)
  got, want = _metrics(Path(online.output_dir)), _metrics(out)
  for key in ("test_dice", "fed_eval_dice"):
    assert float(got[0][key]) == pytest.approx(float(want[0][key]), abs=2e-3), key
  assert float(got[1]["train_loss"]) == pytest.approx(float(want[1]["train_loss"]), rel=1e-3)


def test_demo_lora_flagfile_is_the_demo_with_adapters():
  demo, lora_demo = flagfile_config("demo.flags"), flagfile_config("demo_lora.flags")
  differing = {k for k in demo if demo[k] != lora_demo[k]}
  assert differing == {"output_dir", "adapter", "lora_alpha", "personalize_steps"}
  assert lora_demo["adapter"] == "lora" and lora_demo["execution"] == "tf"
  assert (lora_demo["lora_rank"], lora_demo["lora_alpha"], lora_demo["lora_targets"]) == (
      4, 512.0, ["qkv"])
