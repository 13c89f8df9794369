"""The predict command: masks of the image's size, overlays, and clear prompt errors."""

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tff_sam.data import datasets
from tff_sam.data import discovery
from tff_sam.data import reading
from tff_sam.data import synthetic
from tff_sam import errors
from tff_sam.evaluation import inference
from tff_sam import fileio
from tff_sam.models import losses

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  root = synthetic.generate(tmp_path_factory.mktemp("d") / "syn", images_per_site=1,
                            test_per_site=0)
  return sorted((root / "site_0" / "images").iterdir()) + sorted(
      (root / "site_1" / "images").iterdir())


def test_box_prediction_writes_mask_and_overlay_of_image_size(tmp_path, images):
  h, w = reading.read_image(images[0]).shape[:2]
  written = inference.predict_paths(
      model="tiny", image=str(images[0]), boxes=[[5, 6, 40, 50], [50, 20, 90, 60]], points=[],
      output=str(tmp_path / "o.png"), mask_out=str(tmp_path / "m.png"))
  assert written == [tmp_path / "o.png", tmp_path / "m.png"]
  with Image.open(tmp_path / "o.png") as im:
    assert im.format == "PNG" and im.size == (w, h) and im.mode == "RGB"
  mask = cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_UNCHANGED)
  assert mask.shape == (h, w) and mask.dtype == np.uint16
  assert set(np.unique(mask)) <= {0, 1, 2}


def test_points_and_both_modes_and_batch_folder(tmp_path, images):
  folder = tmp_path / "in"
  folder.mkdir()
  for p in images:
    (folder / p.name).write_bytes(p.read_bytes())
  written = inference.predict_paths(
      model="tiny", image=str(folder), boxes=[[10, 10, 60, 60]], points=[[30, 30], [5, 5, 0]],
      output=str(tmp_path / "out"), mask_out=str(tmp_path / "masks"))
  assert len(written) == 2 * len(images)
  for p in images:
    h, w = reading.read_image(p).shape[:2]
    assert cv2.imread(str(tmp_path / "masks" / f"{p.stem}.png"), cv2.IMREAD_UNCHANGED).shape == (h, w)
  written = inference.predict_paths(model="tiny", image=str(images[0]), boxes=[],
                                    points=[[30, 30]], output=str(tmp_path / "p.png"))
  assert written == [tmp_path / "p.png"]


@pytest.mark.parametrize("boxes,points,flag", [
    ([[-5, 0, 10, 10]], [], "--box"),
    ([[0, 0, 10, 10_000]], [], "--box"),
    ([[20, 20, 10, 30]], [], "--box"),
    ([], [[1e6, 3]], "--point"),
    ([[0, 0, 5, 5], [1, 1, 6, 6]], [[2, 2]], "--point"),
    ([], [[2, 2, 7]], "--point"),
    ([], [], "--box"),
])
def test_bad_prompts_are_refused(tmp_path, images, boxes, points, flag):
  with pytest.raises(errors.ConfigError) as info:
    inference.predict_paths(model="tiny", image=str(images[0]), boxes=boxes, points=points,
                            output=str(tmp_path / "o.png"))
  assert str(info.value).startswith(flag) and "\n" not in str(info.value)
  assert not (tmp_path / "o.png").exists()


def test_a_box_may_end_at_the_image_edge(tmp_path, images):
  """SAM's own coordinates allow x1 == width: the whole image is a valid box."""
  h, w = reading.read_image(images[0]).shape[:2]
  inference.predict_paths(model="tiny", image=str(images[0]), boxes=[[0, 0, w, h]], points=[],
                          output=str(tmp_path / "o.png"))
  assert (tmp_path / "o.png").is_file()
  with pytest.raises(errors.ConfigError, match=rf"^--box: coordinate \({w + 1}, {h}\) is "
                     rf"outside the {w}x{h} image \(0..{w}, 0..{h}\)$"):
    inference.predict_paths(model="tiny", image=str(images[0]), boxes=[[0, 0, w + 1, h]],
                            points=[], output=str(tmp_path / "o2.png"))


def test_cli_errors_are_one_line(tmp_path, images, run_binary):
  bad = tmp_path / "bad.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
  for args, expected in [
      ([f"--image={images[0]}", "--box=0,0,10000,10"], "--box: coordinate"),
      ([f"--image={bad}", "--box=0,0,1,1"], "bad.png: cannot read file"),
      ([f"--image={images[0]}", "--box=1,2,3"], "--box: cannot parse"),
      (["--box=1,2,3,4"], "--image: is required"),
  ]:
    result = run_binary("predict", "--model=tiny", f"--output={tmp_path / 'o.png'}", *args)
    assert result.code == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len(result.error_lines()) == 1, result.stderr[-2000:]
    assert expected in result.error_lines()[0]
  assert not (tmp_path / "o.png").exists()


def test_cli_smoke_run(tmp_path, images):
  """The binary in a fresh process: an overlay and a label mask, their paths printed."""
  proc = subprocess.run(
      [sys.executable, "-m", "tff_sam.experiments.predict", "--model=tiny",
       f"--image={images[0]}", "--box=5,6,40,50", f"--output={tmp_path / 'o.png'}",
       f"--mask_out={tmp_path / 'm.png'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == [str(tmp_path / "o.png"), str(tmp_path / "m.png")]
  assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_mobile_sam_box_prediction_matches_ground_truth(tmp_path):
  root = datasets.named_dataset("sample", cache_root=fileio.default_cache_dir())
  example = discovery.list_examples(root / "test" / "bacteria")[0]
  labels = reading.read_mask(example.mask_path)
  ids = reading.object_ids(labels)
  sizes = [(labels == i).sum() for i in ids]
  obj = ids[int(np.argmax(sizes))]
  ys, xs = np.nonzero(labels == obj)
  inference.predict_paths(
      model="mobile_sam", image=str(example.image_path),
      boxes=[[xs.min(), ys.min(), xs.max(), ys.max()]], points=[],
      output=str(tmp_path / "o.png"), mask_out=str(tmp_path / "m.png"))
  mask = cv2.imread(str(tmp_path / "m.png"), cv2.IMREAD_UNCHANGED)
  dice, _ = losses.dice_iou(mask == 1, labels == obj)
  assert dice >= 0.8
