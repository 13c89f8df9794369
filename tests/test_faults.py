"""The data fault suite (docs/DATA_FAULTS.md): every bad-data case has a defined outcome.

By default a bad example is a one-line `errors.DataError` naming the file; with
`skip_bad_examples=True` it is skipped with a one-line warning naming the file and
the reason, and counted under that reason. The fault folders are built here, in
`tmp_path`, from small images (plus one 6000x4000 image).
"""

import collections
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from tff_sam.data import cache
from tff_sam.data import discovery
from tff_sam.data import preprocess
from tff_sam.data import reading
from tff_sam import errors
from tff_sam.models import sam as sam_lib

H, W = 24, 32


pytestmark = pytest.mark.usefixtures("isolated_cache")


# ----------------------------------------------------------------------------- writers


def _image(seed: int = 0, shape=(H, W, 3)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def _mask(shape=(H, W), value: int = 255) -> np.ndarray:
  m = np.zeros(shape, np.uint8)
  m[4:14, 6:20] = value
  return m


def _dirs(folder: Path) -> tuple[Path, Path]:
  images, masks = folder / "images", folder / "masks"
  images.mkdir(parents=True, exist_ok=True)
  masks.mkdir(parents=True, exist_ok=True)
  return images, masks


def _pair(folder: Path, stem: str, *, seed: int = 0) -> None:
  images, masks = _dirs(folder)
  Image.fromarray(_image(seed)).save(images / f"{stem}.png")
  Image.fromarray(_mask()).save(masks / f"{stem}.png")


def _fault_folder(root: Path) -> dict[str, Path]:
  """One folder with good examples and one example of every per-file fault.

  Returns:
    Fault name -> the file the error/warning must name.
  """
  images, masks = _dirs(root)
  _pair(root, "good", seed=1)
  bad = {}

  # 1. Corrupt: a PNG signature followed by garbage; a JPEG cut in half.
  (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
  Image.fromarray(_mask()).save(masks / "corrupt.png")
  bad["corrupt"] = images / "corrupt.png"
  ok, jpg = cv2.imencode(".jpg", _image(2))
  assert ok
  (images / "truncated.jpg").write_bytes(jpg.tobytes()[:len(jpg) // 2])
  Image.fromarray(_mask()).save(masks / "truncated.png")
  bad["truncated"] = images / "truncated.jpg"

  # 2. Mask of another size than its image.
  Image.fromarray(_image(3)).save(images / "mismatch.png")
  Image.fromarray(_mask((H, W + 1))).save(masks / "mismatch.png")
  bad["size_mismatch"] = masks / "mismatch.png"

  # 3. Empty mask: valid, the image has no objects.
  Image.fromarray(_image(4)).save(images / "empty.png")
  Image.fromarray(np.zeros((H, W), np.uint8)).save(masks / "empty.png")

  # 5. Integer values {0, 1, 2, 255}: instance labels (3 objects); 0.5 in a float mask: bad.
  Image.fromarray(_image(5)).save(images / "labels.png")
  lab = np.zeros((H, W), np.uint8)
  lab[2:8, 2:10], lab[12:20, 2:10], lab[12:20, 16:28] = 1, 2, 255
  Image.fromarray(lab).save(masks / "labels.png")
  Image.fromarray(_image(6)).save(images / "floaty.png")
  fmask = _mask().astype(np.float32) / 255
  fmask[4, 6] = 0.5
  tifffile.imwrite(masks / "floaty.tif", fmask)
  bad["bad_mask_values"] = masks / "floaty.tif"

  # 6. RGBA, 16-bit RGB, 16-bit gray and 8-bit gray images: supported.
  Image.fromarray(_image(7, (H, W, 4)), mode="RGBA").save(images / "rgba.png")
  tifffile.imwrite(images / "rgb16.tif", _image(8).astype(np.uint16) * 200, photometric="rgb")
  assert cv2.imwrite(str(images / "gray16.png"), _image(9, (H, W)).astype(np.uint16) * 250)
  Image.fromarray(_image(10, (H, W))).save(images / "gray8.png")
  for stem in ("rgba", "rgb16", "gray16", "gray8"):
    Image.fromarray(_mask()).save(masks / f"{stem}.png")
  return bad


GOOD = ["empty", "good", "gray16", "gray8", "labels", "rgb16", "rgba"]
SKIPPED = {"unreadable": 2, "size_mismatch": 1, "bad_mask_values": 1}


def _assert_one_line_error(exc: BaseException, path: Path) -> None:
  assert isinstance(exc, errors.DataError), repr(exc)
  assert exc.path == str(path)
  assert str(exc).startswith(str(path) + ": ")
  assert "\n" not in str(exc)


def _warnings(caplog) -> list[str]:
  """tff_sam's warnings (not e.g. TensorFlow's retracing notices)."""
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and r.name.startswith("tff_sam")]


def _assert_warned(caplog, expected: dict[Path, str]) -> None:
  """One warning line per skipped file, naming it and the reason."""
  lines = _warnings(caplog)
  assert len(lines) == len(expected), lines
  for line in lines:
    assert "\n" not in line
  for path, reason in expected.items():
    assert sum(str(path) in l and f"({reason})" in l for l in lines) == 1, (path, lines)


def _build(bundle, examples, cache_root, **kw):
  args = dict(bundle=bundle, cache_root=cache_root, binary_components=False, batch_size=4,
              show_progress=False)
  args.update(kw)
  return cache.build_records(examples, **args)


# ----------------------------------------------------------------------------- per-file faults


@pytest.mark.parametrize("fault", ["corrupt", "truncated", "size_mismatch", "bad_mask_values"])
def test_per_file_fault_is_one_line_error_by_default(tmp_path, bundle, fault):
  bad = _fault_folder(tmp_path / "d")
  examples = discovery.list_examples(tmp_path / "d")
  path = bad[fault]
  (ex,) = [e for e in examples if path in (e.image_path, e.mask_path)]
  with pytest.raises(errors.DataError) as e:
    reading.load_example(ex)
  _assert_one_line_error(e.value, path)
  # build_records stops at the first bad example, with the same error.
  (good,) = [e for e in examples if e.stem == "good"]
  with pytest.raises(errors.DataError) as e:
    _build(bundle, [good, ex], tmp_path / "cache")
  _assert_one_line_error(e.value, path)


def test_fault_messages(tmp_path):
  bad = _fault_folder(tmp_path)
  by_path = {e.image_path: e for e in discovery.list_examples(tmp_path)}
  by_path.update({e.mask_path: e for e in by_path.values()})

  def message(fault):
    with pytest.raises(discovery.ExampleError) as e:
      reading.load_example(by_path[bad[fault]])
    return e.value
  assert message("corrupt").reason == "unreadable"
  assert "cannot read file" in str(message("corrupt"))
  assert message("truncated").reason == "unreadable"
  assert "truncated" in str(message("truncated"))
  m = message("size_mismatch")
  assert m.reason == "size_mismatch"
  assert f"{H}x{W + 1}" in str(m) and f"{H}x{W}" in str(m) and "mismatch.png" in str(m)
  m = message("bad_mask_values")
  assert m.reason == "bad_mask_values" and "non-integer" in str(m)


def test_build_records_skips_bad_examples(tmp_path, bundle, caplog):
  bad = _fault_folder(tmp_path / "d")
  examples = discovery.list_examples(tmp_path / "d")
  assert len(examples) == len(GOOD) + 4
  cache_dir = tmp_path / "cache"
  with caplog.at_level(logging.WARNING):
    records, stats = _build(bundle, examples, cache_dir, skip_bad_examples=True)
  _assert_warned(caplog, {bad["corrupt"]: "unreadable", bad["truncated"]: "unreadable",
                          bad["size_mismatch"]: "size_mismatch",
                          bad["bad_mask_values"]: "bad_mask_values"})
  assert stats.skipped == SKIPPED and stats.num_skipped == 4
  assert (stats.images, stats.encoded, stats.reused) == (len(examples), len(GOOD), 0)
  # Records are the good examples only, in order, each carrying its example.
  assert [r.example.stem for r in records] == GOOD
  assert all(r.path.exists() for r in records)
  objects = {r.example.stem: r.num_objects for r in records}
  # 3. The empty mask is kept (not an error), has no object, and is counted.
  assert objects["empty"] == 0 and stats.images_without_objects == 1
  # 5. {0, 1, 2, 255} are three instance labels.
  assert objects["labels"] == 3
  assert all(n == 1 for s, n in objects.items() if s not in ("empty", "labels"))
  assert stats.objects == sum(objects.values())
  # The empty-mask image is kept out of training by the manifest.
  counts = cache.write_manifests(tmp_path / "clients", {"c": records})
  assert counts == {"c": len(GOOD) - 1}
  # summary.json stores vars(stats): still JSON.
  assert json.loads(json.dumps(vars(stats)))["skipped"] == SKIPPED

  # A second build reuses the good records and skips (and counts) the bad ones again.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    again, stats2 = _build(bundle, examples, cache_dir, skip_bad_examples=True)
  assert len(_warnings(caplog)) == 4
  assert (stats2.encoded, stats2.reused, stats2.skipped) == (0, len(GOOD), SKIPPED)
  assert again == records

  # Without skipping, good examples give one record per example, as before.
  good = [r.example for r in records]
  plain, stats3 = _build(bundle, good, cache_dir)
  assert [r.example for r in plain] == good and stats3.skipped == {}


def test_skip_whole_batch_and_stats_add(tmp_path, bundle, caplog):
  bad = _fault_folder(tmp_path / "d")
  examples = [e for e in discovery.list_examples(tmp_path / "d")
              if bad["corrupt"] == e.image_path or bad["truncated"] == e.image_path]
  with caplog.at_level(logging.WARNING):
    records, stats = _build(bundle, examples, tmp_path / "cache", skip_bad_examples=True,
                            batch_size=2)
  assert records == [] and stats.skipped == {"unreadable": 2}
  total = cache.CacheStats()
  total.add(stats)
  total.add(cache.CacheStats(images=1, skipped={"unreadable": 1, "size_mismatch": 1}))
  assert total.skipped == {"unreadable": 3, "size_mismatch": 1}
  assert total.images == 3 and total.num_skipped == 4


# ----------------------------------------------------------------------------- 6. image formats


def test_rgba_16bit_gray_images_read_and_encode(tmp_path, bundle):
  _fault_folder(tmp_path / "d")
  examples = {e.stem: e for e in discovery.list_examples(tmp_path / "d")}
  chosen = [examples[s] for s in ("rgba", "rgb16", "gray16", "gray8")]
  for ex in chosen:
    image = reading.read_image(ex.image_path)
    assert image.dtype == np.uint8 and image.shape == (H, W, 3), ex.stem
    assert image.max() > image.min()  # 16-bit is scaled, not clipped to black
  rgba = reading.read_image(examples["rgba"].image_path)
  np.testing.assert_array_equal(rgba, _image(7, (H, W, 4))[..., :3])
  records, stats = _build(bundle, chosen, tmp_path / "cache")
  assert stats.encoded == 4 and stats.skipped == {}
  for r in records:
    rec = cache.read_record(r.path, embedding_shape=sam_lib.embedding_shape(bundle.config),
                                 input_size=sam_lib.image_size(bundle.config))
    assert tuple(rec["original_size"]) == (H, W)
    assert np.isfinite(rec["embedding"]).all()


# ----------------------------------------------------------------------------- listing faults


def test_unpaired_files(tmp_path, caplog):
  _pair(tmp_path, "a")
  _pair(tmp_path, "b")
  images, masks = _dirs(tmp_path)
  (masks / "a.png").unlink()  # image without mask
  Image.fromarray(_mask()).save(masks / "z.png")  # mask without image
  with pytest.raises(errors.DataError) as e:
    discovery.list_examples(tmp_path)
  _assert_one_line_error(e.value, images / "a.png")
  assert "has no mask" in str(e.value)
  (images / "a.png").rename(tmp_path / "a.png")
  with pytest.raises(errors.DataError) as e:
    discovery.list_examples(tmp_path)
  _assert_one_line_error(e.value, masks / "z.png")
  assert "has no image" in str(e.value)
  (tmp_path / "a.png").rename(images / "a.png")

  skipped = collections.Counter()
  with caplog.at_level(logging.WARNING):
    examples = discovery.list_examples(tmp_path, skip_bad_examples=True, skipped=skipped)
  assert [e.stem for e in examples] == ["b"]
  assert skipped == {"unpaired": 2}
  _assert_warned(caplog, {images / "a.png": "unpaired", masks / "z.png": "unpaired"})
  # Counting is optional.
  assert discovery.list_examples(tmp_path, skip_bad_examples=True) == examples


@pytest.mark.parametrize("where", ["images", "masks"])
def test_duplicate_stem_skips_the_stem(tmp_path, caplog, where):
  for s in ("a", "b"):
    _pair(tmp_path, s)
  tifffile.imwrite(tmp_path / where / "a.tif", _mask() if where == "masks" else _image())
  with pytest.raises(errors.DataError) as e:
    discovery.list_examples(tmp_path)
  _assert_one_line_error(e.value, tmp_path / where / "a.tif")
  assert "duplicate stem" in str(e.value) and "a.png" in str(e.value)

  skipped = collections.Counter()
  with caplog.at_level(logging.WARNING):
    examples = discovery.list_examples(tmp_path, skip_bad_examples=True, skipped=skipped)
  # Neither a.png nor a.tif is used (nor the other side's a.*): one count per stem.
  assert [e.stem for e in examples] == ["b"]
  assert skipped == {"duplicate_stem": 1}
  _assert_warned(caplog, {tmp_path / where / "a.tif": "duplicate_stem"})


def test_duplicate_stem_without_partner_counts_once(tmp_path):
  _pair(tmp_path, "b")
  images, _ = _dirs(tmp_path)
  Image.fromarray(_image()).save(images / "a.png")
  tifffile.imwrite(images / "a.tif", _image())  # no masks/a.*: still one duplicate_stem
  skipped = collections.Counter()
  assert [e.stem for e in discovery.list_examples(
      tmp_path, skip_bad_examples=True, skipped=skipped)] == ["b"]
  assert skipped == {"duplicate_stem": 1}


def test_nothing_left_after_skipping_is_an_error(tmp_path):
  _pair(tmp_path, "a")
  (tmp_path / "masks" / "a.png").rename(tmp_path / "masks" / "x.png")
  skipped = collections.Counter()
  with pytest.raises(errors.DataError) as e:
    discovery.list_examples(tmp_path, skip_bad_examples=True, skipped=skipped)
  _assert_one_line_error(e.value, tmp_path)
  assert "no usable" in str(e.value)
  assert skipped == {"unpaired": 2}


def test_discover_splits_passes_skipping_through(tmp_path):
  for site in ("s0", "s1"):
    for i in range(3):
      _pair(tmp_path / site, f"{site}_{i}")
  _pair(tmp_path / "test", "t0")
  _pair(tmp_path / "test", "t1")
  (tmp_path / "s0" / "masks" / "s0_1.png").unlink()
  tifffile.imwrite(tmp_path / "s1" / "images" / "s1_2.tif", _image())
  (tmp_path / "test" / "images" / "t1.png").unlink()
  kw = dict(partition="iid", num_clients=1, dirichlet_alpha=1.0, test_fraction=0.0, seed=0)
  with pytest.raises(errors.DataError):
    discovery.discover_splits(tmp_path, **kw)
  skipped = collections.Counter()
  splits = discovery.discover_splits(tmp_path, skip_bad_examples=True, skipped=skipped, **kw)
  assert {c: [e.stem for e in v] for c, v in splits.clients.items()} == {
      "s0": ["s0_0", "s0_2"], "s1": ["s1_0", "s1_1"]}
  assert [e.stem for e in splits.test] == ["t0"]
  assert skipped == {"unpaired": 2, "duplicate_stem": 1}
  # Flat layout too.
  flat = tmp_path / "flat"
  for i in range(4):
    _pair(flat, f"f{i}")
  (flat / "images" / "f3.png").unlink()
  skipped = collections.Counter()
  splits = discovery.discover_splits(flat, skip_bad_examples=True, skipped=skipped,
                                **dict(kw, num_clients=3))
  assert splits.num_train_examples == 3 and skipped == {"unpaired": 1}


# ----------------------------------------------------------------------------- 5. mask values


@pytest.mark.parametrize("values,objects", [((0, 1, 2, 255), 3), ((0, 255), 1), ((0, 1), 1),
                                            ((0, 7), 1), ((0,), 0)])
def test_integer_mask_values(tmp_path, values, objects):
  m = np.zeros((H, W), np.uint8)
  for k, v in enumerate(values):
    m[:, k * 4:(k + 1) * 4] = v
  path = tmp_path / "m.png"
  Image.fromarray(m).save(path)
  assert len(reading.object_ids(reading.read_mask(path))) == objects


def test_float_masks(tmp_path):
  ok = tmp_path / "ok.tif"
  tifffile.imwrite(ok, np.array([[0.0, 1.0], [2.0, 2.0]], np.float32))  # integer-valued
  np.testing.assert_array_equal(reading.object_ids(reading.read_mask(ok)), [1, 2])
  for name, values in (("half.tif", [[0.0, 0.5]]), ("nan.tif", [[0.0, np.nan]]),
                       ("prob.tif", [[0.1, 0.9]])):
    tifffile.imwrite(tmp_path / name, np.array(values, np.float32))
    with pytest.raises(discovery.ExampleError) as e:
      reading.read_mask(tmp_path / name)
    _assert_one_line_error(e.value, tmp_path / name)
    assert e.value.reason == "bad_mask_values"


# ----------------------------------------------------------------------------- 8. a large image


def test_large_image_builds_a_record(tmp_path, bundle):
  h, w = 4000, 6000
  images, masks = _dirs(tmp_path / "big")
  image = np.zeros((h, w, 3), np.uint8)
  image[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
  image[1000:3000, 2000:5000] = (30, 200, 90)
  assert cv2.imwrite(str(images / "big.jpg"), image)
  del image
  mask = np.zeros((h, w), np.uint8)
  mask[1000:3000, 2000:5000] = 255
  mask[100:110, 100:110] = 0  # nothing else: one object
  assert cv2.imwrite(str(masks / "big.png"), mask, [cv2.IMWRITE_PNG_COMPRESSION, 1])
  del mask
  (ex,) = discovery.list_examples(tmp_path / "big")
  records, stats = _build(bundle, [ex], tmp_path / "cache")
  assert stats.encoded == 1 and records[0].num_objects == 1
  size = sam_lib.image_size(bundle.config)
  rec = cache.read_record(records[0].path,
                               embedding_shape=sam_lib.embedding_shape(bundle.config),
                               input_size=size)
  assert tuple(rec["original_size"]) == (h, w)
  assert tuple(rec["reshaped_size"]) == preprocess.resized_shape((h, w), size) == (171, size)
  # The box is mapped into SAM's input frame.
  np.testing.assert_allclose(rec["boxes"][0], np.array([2000, 1000, 4999, 2999]) * size / w,
                             atol=0.5)
