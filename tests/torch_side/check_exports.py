"""The PyTorch side of the export tests; runs in the separate torch environment.

  .venv-torch/bin/python tests/torch_side/check_exports.py CASE.json RESULT.json

That environment has torch (CPU), transformers, safetensors and numpy, and no
TensorFlow and no tff_sam. The TF side (tests/test_export.py) writes CASE.json: the
export folder, the inputs (npz) and the TF outputs to compare with. This script loads
each export the way a PyTorch user would and writes what it measured to RESULT.json;
the pytest side decides pass or fail.

* `hf`: `SamModel.from_pretrained(DIR)` (transformers' PyTorch class, the folder's
  `pytorch_model.bin`): loading info (missing / unexpected keys), and the low-resolution
  mask logits and IoU for the case's box, from `pixel_values` (ViT models) or from
  the case's TF image embeddings (MobileSAM); for MobileSAM also the error raised
  when its stand-in image encoder is given pixel values.
* `sam_checkpoint`: the original architecture built with MobileSAM's reference code
  (segment-anything's modules, plus TinyViT) from the pinned sdist, the checkpoint
  loaded with `load_state_dict(safetensors.torch.load_file(path), strict=True)`, then
  image encoder, prompt encoder and mask decoder on the same inputs.
* `image_encoder`: MobileSAM's TinyViT alone, loaded strictly from the folder's
  `image_encoder.safetensors`: its embeddings of the case's pixel values.
"""

import importlib
import json
import sys
import traceback
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import SamModel


def _diff(got: np.ndarray, want: np.ndarray) -> dict:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  flips = float(np.mean((got > 0) != (want > 0)))
  return {"shape": list(got.shape), "want_shape": list(want.shape),
          "max_abs": float(np.abs(got - want).max()) if got.shape == want.shape else None,
          "scale": float(np.abs(want).max()), "sign_flip_fraction": flips}


def _install_timm_stub() -> None:
  """MobileSAM's TinyViT imports three helpers from timm (which pulls torchvision)."""

  class DropPath(torch.nn.Module):

    def __init__(self, drop_prob=None):
      super().__init__()
      if drop_prob:
        raise NotImplementedError("the stand-in DropPath supports drop rate 0 only")

    def forward(self, x):
      return x

  timm = types.ModuleType("timm")
  models = types.ModuleType("timm.models")
  layers = types.ModuleType("timm.models.layers")
  registry = types.ModuleType("timm.models.registry")
  layers.DropPath = DropPath
  layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
  layers.trunc_normal_ = torch.nn.init.trunc_normal_
  registry.register_model = lambda fn: fn
  timm.models, models.layers, models.registry = models, layers, registry
  sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                      "timm.models.registry": registry})


def _reference_code(code_dir: str):
  """MobileSAM's `mobile_sam` package without its `__init__` (which needs torchvision)."""
  _install_timm_stub()
  package = types.ModuleType("mobile_sam")
  package.__path__ = [code_dir]
  sys.modules["mobile_sam"] = package
  return (importlib.import_module("mobile_sam.modeling"),
          importlib.import_module("mobile_sam.build_sam"))


def _reference_vit_sam(modeling, config: dict):
  """segment-anything's `Sam` with a ViT encoder of the sizes of an HF `SamConfig`."""
  vision, prompt, dec = (config["vision_config"], config["prompt_encoder_config"],
                         config["mask_decoder_config"])
  side = prompt["image_size"] // prompt["patch_size"]
  return modeling.Sam(
      image_encoder=modeling.ImageEncoderViT(
          img_size=vision["image_size"], patch_size=vision["patch_size"],
          embed_dim=vision["hidden_size"], depth=vision["num_hidden_layers"],
          num_heads=vision["num_attention_heads"],
          mlp_ratio=vision["mlp_dim"] / vision["hidden_size"],
          out_chans=vision["output_channels"], qkv_bias=vision["qkv_bias"],
          norm_layer=partial(torch.nn.LayerNorm, eps=vision["layer_norm_eps"]),
          use_abs_pos=vision["use_abs_pos"], use_rel_pos=vision["use_rel_pos"],
          window_size=vision["window_size"],
          global_attn_indexes=tuple(vision["global_attn_indexes"])),
      prompt_encoder=modeling.PromptEncoder(
          embed_dim=prompt["hidden_size"], image_embedding_size=(side, side),
          input_image_size=(prompt["image_size"], prompt["image_size"]),
          mask_in_chans=prompt["mask_input_channels"]),
      mask_decoder=modeling.MaskDecoder(
          num_multimask_outputs=dec["num_multimask_outputs"],
          transformer=modeling.TwoWayTransformer(
              depth=dec["num_hidden_layers"], embedding_dim=dec["hidden_size"],
              mlp_dim=dec["mlp_dim"], num_heads=dec["num_attention_heads"]),
          transformer_dim=dec["hidden_size"], iou_head_depth=dec["iou_head_depth"],
          iou_head_hidden_dim=dec["iou_head_hidden_dim"]),
      pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def check_hf(case: dict, inputs: dict, tf_out: dict) -> dict:
  model, info = SamModel.from_pretrained(case["model_dir"], output_loading_info=True)
  model.eval()
  out = {"loading_info": {k: sorted(v) if isinstance(v, (list, set)) else str(v)
                          for k, v in info.items()}}
  boxes = torch.from_numpy(inputs["boxes"])
  with torch.no_grad():
    if case["kind"] == "mobile_sam":
      result = model(image_embeddings=torch.from_numpy(inputs["image_embeddings"]),
                     input_boxes=boxes, multimask_output=False)
      try:
        model(pixel_values=torch.from_numpy(inputs["pixel_values"]), input_boxes=boxes)
        out["pixel_values_error"] = None
      except Exception as e:  # pylint: disable=broad-except
        out["pixel_values_error"] = f"{type(e).__name__}: {e}"
    else:
      result = model(pixel_values=torch.from_numpy(inputs["pixel_values"]), input_boxes=boxes,
                     multimask_output=False)
  out["pred_masks"] = _diff(result.pred_masks.numpy(), tf_out["pred_masks"])
  out["iou_scores"] = _diff(result.iou_scores.numpy(), tf_out["iou_scores"])
  return out


def check_sam_checkpoint(case: dict, inputs: dict, tf_out: dict) -> dict:
  modeling, build_sam = _reference_code(case["mobile_sam_code"])
  if case["kind"] == "mobile_sam":
    sam = build_sam.build_sam_vit_t()
  else:
    sam = _reference_vit_sam(modeling, json.loads(Path(case["model_dir"], "config.json")
                                                  .read_text()))
  result = sam.load_state_dict(load_file(case["sam_checkpoint"]), strict=True)
  sam.eval()
  with torch.no_grad():
    embeddings = sam.image_encoder(torch.from_numpy(inputs["pixel_values"]))
    sparse, dense = sam.prompt_encoder(points=None, boxes=torch.from_numpy(inputs["boxes"][0]),
                                       masks=None)
    low_res, iou = sam.mask_decoder(
        image_embeddings=embeddings, image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        multimask_output=False)
  return {"load": str(result), "embeddings": _diff(embeddings.numpy(), tf_out["embeddings"]),
          "low_res_masks": _diff(low_res.numpy()[None], tf_out["pred_masks"]),
          "iou": _diff(iou.numpy()[None], tf_out["iou_scores"])}


def check_image_encoder(case: dict, inputs: dict, tf_out: dict) -> dict:
  _, build_sam = _reference_code(case["mobile_sam_code"])
  encoder = build_sam.build_sam_vit_t().image_encoder
  result = encoder.load_state_dict(load_file(case["image_encoder"]), strict=True)
  encoder.eval()
  with torch.no_grad():
    embeddings = encoder(torch.from_numpy(inputs["pixel_values"]))
  return {"load": str(result), "embeddings": _diff(embeddings.numpy(), tf_out["embeddings"])}


def main(case_path: str, result_path: str) -> int:
  case = json.loads(Path(case_path).read_text())
  inputs = dict(np.load(case["inputs"]))
  tf_out = dict(np.load(case["tf_outputs"]))
  checks = {"hf": check_hf, "sam_checkpoint": check_sam_checkpoint,
            "image_encoder": check_image_encoder}
  results = {"torch_version": torch.__version__}
  for name in case["checks"]:
    try:
      results[name] = checks[name](case, inputs, tf_out)
    except Exception:  # pylint: disable=broad-except
      results[name] = {"error": traceback.format_exc()}
  Path(result_path).write_text(json.dumps(results, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
