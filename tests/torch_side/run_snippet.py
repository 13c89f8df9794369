"""Runs one README snippet in the PyTorch environment; saves the `mask` it computes.

  .venv-torch/bin/python tests/torch_side/run_snippet.py SNIPPET.py MOBILE_SAM_CODE OUT.npy

`MOBILE_SAM_CODE` is MobileSAM's `mobile_sam` package as fetched by the TF side. It
imports timm and torchvision (for three helpers and two image functions), which this
environment lacks: minimal stand-ins are registered first (timm's as in
check_exports.py; torchvision's `resize`/`to_pil_image` are PIL's bilinear resize and
`Image.fromarray`, what torchvision does for a PIL image).
"""

import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image

import check_exports  # tests/torch_side/, next to this file


def _install_torchvision_stub() -> None:
  def resize(image, size):
    return image.resize((size[1], size[0]), Image.BILINEAR)

  def unavailable(*_, **__):
    raise NotImplementedError("torchvision is not installed in this environment")

  names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional",
           "torchvision.ops", "torchvision.ops.boxes"]
  modules = {n: types.ModuleType(n) for n in names}
  modules["torchvision.transforms.functional"].resize = resize
  modules["torchvision.transforms.functional"].to_pil_image = Image.fromarray
  modules["torchvision.ops.boxes"].batched_nms = unavailable
  modules["torchvision.ops.boxes"].box_area = unavailable
  sys.modules.update(modules)


def main(snippet: str, code_dir: str, out: str) -> int:
  check_exports._install_timm_stub()  # pylint: disable=protected-access
  _install_torchvision_stub()
  sys.path.insert(0, str(Path(code_dir).parent))
  namespace: dict = {}
  exec(compile(Path(snippet).read_text(), snippet, "exec"), namespace)  # pylint: disable=exec-used
  np.save(out, np.asarray(namespace["mask"]))
  return 0


if __name__ == "__main__":
  sys.exit(main(*sys.argv[1:]))
