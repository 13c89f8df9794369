"""Exports that segment correctly everywhere: TF, PyTorch, SAM/MobileSAM code, ONNX.

Each format is loaded the way its users load it and compared with the project's own
TF model on the same inputs: transformers' TF `from_pretrained`; transformers'
PyTorch `SamModel` and the original repositories' builders in a separate PyTorch-only
environment (`.venv-torch`, `tests/torch_side/check_exports.py`); onnxruntime; a TF
SavedModel. Bounds (the issue's): max abs logit difference <= 1e-3, sign flips at most
0.01% of pixels. The tiny random-init model runs in the fast tier; MobileSAM's real
weights in the slow one.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import tensorflow as tf
from transformers import TFSamModel

from tff_sam import config as config_lib
from tff_sam import fileio
from tff_sam.data import datasets
from tff_sam.data import discovery
from tff_sam.data import preprocess
from tff_sam.data import reading
from tff_sam.data import synthetic
from tff_sam.evaluation import inference
from tff_sam.export import formats
from tff_sam.export import pretrained
from tff_sam.models import adapted
from tff_sam.models import build
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import lora
from tff_sam.models import sam as sam_lib

REPO = Path(__file__).resolve().parents[1]
MAX_ABS = 1e-3
MAX_FLIPS = 1e-4

def _image(height: int = 180, width: int = 240) -> np.ndarray:
  image, _ = synthetic.render_example(np.random.default_rng(3), site=1, height=height,
                                      width=width)
  return image


def _perturbed_decoder(bundle):
  """The bundle's decoder with its trainable weights moved (as fine-tuning would)."""
  decoder = build.build_prompt_mask_decoder(bundle, prompt=config_lib.BOTH_PROMPTS)
  rng = np.random.default_rng(0)
  for w in decoder.trainable_weights:
    w.assign(w.numpy() + rng.normal(0, 0.05, w.shape).astype(np.float32))
  return decoder


def _inputs_and_tf_outputs(bundle, out_dir: Path, image: np.ndarray, box) -> tuple[Path, Path]:
  """The case's inputs and the TF model's outputs for them (npz files)."""
  feats = bundle.processor(images=image, return_tensors="np")
  pixels = feats["pixel_values"].astype(np.float32)
  side = sam_lib.image_size(bundle.config)
  boxes = preprocess.to_input_frame(np.asarray(box, np.float32).reshape(1, 2, 2),
                                    image.shape[:2], side).reshape(1, 1, 4)
  embeddings = bundle.encoder_fn()(tf.constant(pixels)).numpy()
  out = bundle.sam(pixel_values=None, image_embeddings=tf.constant(embeddings),
                   input_boxes=tf.constant(boxes), multimask_output=False)
  np.savez(out_dir / "inputs.npz", pixel_values=pixels, boxes=boxes.astype(np.float32),
           image_embeddings=embeddings)
  np.savez(out_dir / "tf_outputs.npz", pred_masks=out.pred_masks.numpy(),
           iou_scores=out.iou_scores.numpy(), embeddings=embeddings)
  return out_dir / "inputs.npz", out_dir / "tf_outputs.npz"


def _run_torch_side(torch_env, case: dict, work: Path) -> dict:
  (work / "case.json").write_text(json.dumps(case))
  proc = torch_env("check_exports.py", work / "case.json", work / "result.json")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((work / "result.json").read_text())
  for name in case["checks"]:
    assert "error" not in result[name], result[name]["error"]
  return result


def _assert_close(diff: dict, what: str) -> None:
  assert diff["shape"] == diff["want_shape"], (what, diff)
  assert diff["max_abs"] <= MAX_ABS, (what, diff)
  assert diff["sign_flip_fraction"] <= MAX_FLIPS, (what, diff)


def _export(bundle, tmp: Path) -> tuple[Path, object]:
  decoder = _perturbed_decoder(bundle)
  model_dir = pretrained.export_model(bundle=bundle, decoder=decoder, out_dir=tmp / "model")
  return model_dir, decoder


@pytest.fixture(name="tiny_export", scope="module")
def _tiny_export(tmp_path_factory):
  """A fine-tuned (perturbed) tiny model exported, reloaded, and the case's TF outputs."""
  tmp = tmp_path_factory.mktemp("tiny_export")
  model_dir, decoder = _export(build.load_sam(config_lib.TINY_MODEL), tmp)
  loaded = build.load_sam(str(model_dir))
  image = _image()
  inputs, outputs = _inputs_and_tf_outputs(loaded, tmp, image, [20, 30, 150, 140])
  return dict(dir=model_dir, decoder=decoder, bundle=loaded, image=image, tmp=tmp,
              inputs=inputs, outputs=outputs)


def test_export_folder_holds_every_layout(tiny_export):
  names = {p.name for p in tiny_export["dir"].iterdir()}
  assert {"config.json", "tf_model.h5", "pytorch_model.bin", "preprocessor_config.json",
          "README.md"} <= names
  assert "model.safetensors" not in names  # it would break TFSamModel.from_pretrained
  # The export carries the fine-tuned decoder, not the pretrained one.
  fine_tuned = decoder_lib.prompt_decoder_weights(tiny_export["decoder"])
  loaded = decoder_lib.prompt_decoder_weights(tiny_export["bundle"].sam)
  assert fine_tuned.keys() == loaded.keys()
  for key, value in fine_tuned.items():
    np.testing.assert_array_equal(loaded[key].numpy(), value.numpy())


def test_plain_tf_from_pretrained_reproduces_the_model(tiny_export):
  sam = TFSamModel.from_pretrained(str(tiny_export["dir"]))
  inputs = np.load(tiny_export["inputs"])
  want = np.load(tiny_export["outputs"])
  out = sam(pixel_values=tf.constant(inputs["pixel_values"]),
            input_boxes=tf.constant(inputs["boxes"]), multimask_output=False)
  np.testing.assert_allclose(out.pred_masks.numpy(), want["pred_masks"], atol=1e-5)


def test_pytorch_loads_the_export_and_the_sam_checkpoint(tiny_export, reference_code, torch_env):
  checkpoint = formats.export(model=str(tiny_export["dir"]),
                              export_format=config_lib.SAM_CHECKPOINT_FORMAT,
                              output_dir=tiny_export["tmp"] / "sam_checkpoint")[0]
  result = _run_torch_side(torch_env, dict(
      kind="vit", model_dir=str(tiny_export["dir"]), inputs=str(tiny_export["inputs"]),
      tf_outputs=str(tiny_export["outputs"]), sam_checkpoint=str(checkpoint),
      mobile_sam_code=str(reference_code), checks=["hf", "sam_checkpoint"]),
      tiny_export["tmp"])
  hf = result["hf"]
  assert hf["loading_info"]["missing_keys"] == [], hf["loading_info"]
  assert hf["loading_info"]["unexpected_keys"] == [], hf["loading_info"]
  _assert_close(hf["pred_masks"], "transformers SamModel masks")
  _assert_close(hf["iou_scores"], "transformers SamModel IoU")
  sam = result["sam_checkpoint"]
  assert sam["load"] == "<All keys matched successfully>", sam["load"]  # strict=True
  _assert_close(sam["embeddings"], "segment-anything image encoder")
  _assert_close(sam["low_res_masks"], "segment-anything masks")


def _onnx_case(bundle, onnx_dir: Path, image: np.ndarray, box):
  """Runs the ONNX encoder + decoder as segment-anything's predictor would."""
  feats = bundle.processor(images=image, return_tensors="np")
  encoder = onnxruntime.InferenceSession(str(onnx_dir / formats.ONNX_ENCODER))
  decoder = onnxruntime.InferenceSession(str(onnx_dir / formats.ONNX_DECODER))
  embeddings = encoder.run(None, {"pixel_values": feats["pixel_values"].astype(np.float32)})[0]
  side = sam_lib.image_size(bundle.config)
  corners = preprocess.to_input_frame(np.asarray(box, np.float32).reshape(1, 2, 2),
                                      image.shape[:2], side)
  low = sam_lib.low_res_size(bundle.config)
  feed = {"image_embeddings": embeddings, "point_coords": corners.astype(np.float32),
          "point_labels": np.array([[2, 3]], np.float32),
          "mask_input": np.zeros((1, 1, low, low), np.float32),
          "has_mask_input": np.zeros(1, np.float32),
          "orig_im_size": np.array(image.shape[:2], np.float32)}
  return feats, embeddings, corners, decoder.run(None, feed), [o.name for o in decoder.get_outputs()]


def test_onnx_matches_tf(tiny_export):
  bundle, image, box = tiny_export["bundle"], tiny_export["image"], [20, 30, 150, 140]
  onnx_dir = tiny_export["tmp"] / "onnx"
  formats.export(model=str(tiny_export["dir"]), export_format=config_lib.ONNX_FORMAT,
                 output_dir=onnx_dir)
  feats, embeddings, corners, (masks, iou, low_res), names = _onnx_case(
      bundle, onnx_dir, image, box)
  assert names == ["masks", "iou_predictions", "low_res_masks"]  # segment-anything's order
  want = bundle.encoder_fn()(tf.constant(feats["pixel_values"].astype(np.float32))).numpy()
  assert np.abs(embeddings - want).max() <= MAX_ABS
  # A box alone is two points: segment-anything's ONNX model then returns the best of
  # the three multimask outputs by predicted IoU.
  out = bundle.sam(pixel_values=None, image_embeddings=tf.constant(want),
                   input_boxes=tf.constant(corners.reshape(1, 1, 4)), multimask_output=True)
  best = int(np.argmax(out.iou_scores.numpy()[0, 0]))
  ref_low = out.pred_masks.numpy()[0, 0, best]
  assert np.abs(low_res[0, 0] - ref_low).max() <= MAX_ABS
  assert iou[0, 0] == pytest.approx(float(out.iou_scores.numpy()[0, 0, best]), abs=MAX_ABS)
  ref = bundle.processor.post_process_masks(
      [out.pred_masks.numpy()[:, 0, best:best + 1]], [image.shape[:2]],
      [feats["reshaped_input_sizes"][0]], binarize=False, return_tensors="tf")[0].numpy()
  assert masks.shape == (1, 1) + image.shape[:2]
  assert np.abs(masks - ref).max() <= MAX_ABS
  assert np.mean((masks > 0) != (ref > 0)) <= MAX_FLIPS


def test_saved_model_segments_like_the_predictor(tiny_export):
  path = formats.export(model=str(tiny_export["dir"]),
                        export_format=config_lib.SAVED_MODEL_FORMAT,
                        output_dir=tiny_export["tmp"] / "saved_model")[0]
  image = tiny_export["image"]
  boxes = np.array([[20, 30, 150, 140], [120, 20, 220, 100]], np.float32)
  serving = tf.saved_model.load(str(path)).signatures["serving_default"]
  out = serving(image=tf.constant(image), boxes=tf.constant(boxes))
  want = inference.Predictor(tiny_export["bundle"], prompt=config_lib.BOX_PROMPT)(
      image, boxes=boxes)
  masks = out["masks"].numpy()
  assert masks.shape == want.shape == (2,) + image.shape[:2] and masks.dtype == bool
  # Only the image resize differs (TF's antialiased bilinear vs PIL's bilinear).
  assert np.mean(masks == want) >= 0.999
  assert out["iou_scores"].shape == (2,)


def test_export_binary_errors(tmp_path, tiny_export, run_binary):
  for args, expected in [
      ([f"--model={tiny_export['dir']}", "--format=tflite"], "--format: must be one of"),
      (["--format=onnx"], "--model: is required"),
      ([f"--model={tmp_path}", "--format=onnx"], "no config.json"),
      (["--model=tiny", "--format=onnx"], "--output_dir: is required"),
  ]:
    result = run_binary("export", *args)
    assert result.code == 1, result.stderr[-2000:]
    assert len(result.error_lines()) == 1 and expected in result.error_lines()[0], (
        result.stderr[-2000:])


def test_export_binary_smoke(tiny_export):
  """The binary in a fresh process, default output folder next to the model."""
  proc = subprocess.run(
      [sys.executable, "-m", "tff_sam.experiments.export", f"--model={tiny_export['dir']}",
       "--format=sam_checkpoint"], cwd=REPO, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  written = Path(proc.stdout.split()[-1])
  assert written == tiny_export["dir"].parent / "exports" / "sam_checkpoint" / formats.SAM_CHECKPOINT
  assert written.is_file()


@pytest.mark.slow
def _sample_case(bundle, tmp: Path, client: str):
  """The first held-out sample image of `client` with its first object's box, and the
  case's inputs and TF outputs (`_inputs_and_tf_outputs`)."""
  root = datasets.named_dataset(config_lib.SAMPLE_DATASET, cache_root=fileio.default_cache_dir())
  example = discovery.list_examples(root / "test" / client)[0]
  image = reading.read_image(example.image_path)
  labels = reading.read_mask(example.mask_path)
  box = preprocess.boxes_from_labels(labels, reading.object_ids(labels)[:1])[0].tolist()
  return (image, box, *_inputs_and_tf_outputs(bundle, tmp, image, box))


def _mobile_sam_torch_checks(torch_env, model_dir: Path, inputs: Path, outputs: Path,
                             reference_code: Path, tmp: Path) -> dict:
  """A MobileSAM-style export in PyTorch: transformers' `SamModel`, its MobileSAM
  checkpoint in MobileSAM's own code, and the TinyViT safetensors."""
  checkpoint = formats.export(model=str(model_dir),
                              export_format=config_lib.SAM_CHECKPOINT_FORMAT,
                              output_dir=tmp / "sam_checkpoint")[0]
  return _run_torch_side(torch_env, dict(
      kind="mobile_sam", model_dir=str(model_dir), inputs=str(inputs),
      tf_outputs=str(outputs), sam_checkpoint=str(checkpoint),
      image_encoder=str(model_dir / pretrained.TORCH_IMAGE_ENCODER),
      mobile_sam_code=str(reference_code), checks=["hf", "sam_checkpoint", "image_encoder"]),
      tmp)


def test_mobile_sam_exports_segment_in_every_framework(tmp_path, reference_code, torch_env):
  bundle = build.load_sam(config_lib.MOBILE_SAM_MODEL)
  model_dir, _ = _export(bundle, tmp_path)
  loaded = build.load_sam(str(model_dir))
  assert loaded.image_encoder is not None
  image, box, inputs, outputs = _sample_case(loaded, tmp_path, "hela")
  # The stand-in ViT of the TFSamModel refuses pixel values instead of segmenting wrong.
  sam = TFSamModel.from_pretrained(str(model_dir))
  with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
    sam(pixel_values=tf.constant(np.load(inputs)["pixel_values"]),
        input_boxes=tf.constant(np.load(inputs)["boxes"]))
  result = _mobile_sam_torch_checks(torch_env, model_dir, inputs, outputs, reference_code,
                                    tmp_path)
  hf = result["hf"]
  assert hf["loading_info"]["missing_keys"] == [] and hf["loading_info"]["unexpected_keys"] == []
  assert "Input image size (1024*1024) doesn't match model (16*16)" in hf["pixel_values_error"]
  _assert_close(hf["pred_masks"], "transformers SamModel masks (MobileSAM decoder)")
  for name in ("sam_checkpoint", "image_encoder"):
    assert result[name]["load"] == "<All keys matched successfully>", result[name]["load"]
    _assert_close(result[name]["embeddings"], f"MobileSAM TinyViT ({name})")
  _assert_close(result["sam_checkpoint"]["low_res_masks"], "MobileSAM masks")
  # ONNX with the real TinyViT.
  onnx_dir = tmp_path / "onnx"
  formats.export(model=str(model_dir), export_format=config_lib.ONNX_FORMAT,
                 output_dir=onnx_dir)
  _, embeddings, _, _, _ = _onnx_case(loaded, onnx_dir, image, box)
  assert np.abs(embeddings - np.load(outputs)["embeddings"]).max() <= MAX_ABS


@pytest.mark.slow
def test_mobile_sam_lora_export_is_the_adapted_model_everywhere(tmp_path, reference_code,
                                                                torch_env):
  """`--adapter=lora`: the export carries the adapters merged into TinyViT; every loader
  (tff_sam, PyTorch's MobileSAM code, the TinyViT safetensors) computes the adapted
  model's embeddings without adapter code."""
  bundle = build.load_sam(config_lib.MOBILE_SAM_MODEL)
  site = adapted.write_site_weights(bundle, cache_root=tmp_path / "cache")
  model = build.build_adapted_model(bundle, site=site, start=None,
                                    lora=lora.LoraSpec(targets=("qkv", "mlp")))
  rng = np.random.default_rng(0)
  for a in model.adapters:
    a.layer.lora_b.assign(rng.normal(0, 0.05, a.layer.lora_b.shape).astype(np.float32))
  model_dir = pretrained.export_model(bundle=bundle, decoder=model.decoder,
                                      out_dir=tmp_path / "model", adapted=model)
  assert lora.load_adapter(model_dir / pretrained.ADAPTER_DIR).spec.targets == ("qkv", "mlp")
  loaded = build.load_sam(str(model_dir))
  _, _, inputs, outputs = _sample_case(loaded, tmp_path, "bacteria")
  pixels = tf.constant(np.load(inputs)["pixel_values"])
  unmerged = model.embed({"pixel_values": pixels}).numpy()
  merged = np.load(outputs)["embeddings"]
  base = bundle.encoder_fn()(pixels).numpy()
  assert np.abs(unmerged - base).max() > 1e-2  # The adapters change the embeddings...
  np.testing.assert_allclose(merged, unmerged, atol=1e-5 * np.abs(unmerged).max())  # ...merged.
  result = _mobile_sam_torch_checks(torch_env, model_dir, inputs, outputs, reference_code,
                                    tmp_path)
  _assert_close(result["hf"]["pred_masks"], "transformers SamModel masks (LoRA export)")
  for name in ("sam_checkpoint", "image_encoder"):
    assert result[name]["load"] == "<All keys matched successfully>", result[name]["load"]
    _assert_close(result[name]["embeddings"], f"merged TinyViT in PyTorch ({name})")
  _assert_close(result["sam_checkpoint"]["low_res_masks"], "MobileSAM masks (LoRA export)")
