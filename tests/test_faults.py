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
from tff_sam.evaluation import heldout
from tff_sam.evaluation import inference
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

  # 9. A JPEG mask: lossy, refused (a JPEG image with a PNG mask is fine).
  Image.fromarray(_image(11)).save(images / "jpegmask.png")
  Image.fromarray(_mask()).save(masks / "jpegmask.jpg", quality=75)
  bad["lossy_mask"] = masks / "jpegmask.jpg"
  Image.fromarray(_image(12)).save(images / "jpegimage.jpg", quality=90)
  Image.fromarray(_mask()).save(masks / "jpegimage.png")

  # 10. An RGB mask with differing channels: red objects on black, refused.
  Image.fromarray(_image(13)).save(images / "colour.png")
  red = np.zeros((H, W, 3), np.uint8)
  red[_mask() > 0] = (255, 0, 0)
  Image.fromarray(red).save(masks / "colour.png")
  bad["colour_mask"] = masks / "colour.png"
  return bad


GOOD = ["empty", "good", "gray16", "gray8", "jpegimage", "labels", "rgb16", "rgba"]
SKIPPED = {"unreadable": 2, "size_mismatch": 1, "bad_mask_values": 1, "lossy_mask": 1,
           "colour_mask": 1}


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


@pytest.mark.parametrize("fault", ["corrupt", "truncated", "size_mismatch", "bad_mask_values",
                                   "lossy_mask", "colour_mask"])
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
  m = message("lossy_mask")
  assert m.reason == "lossy_mask" and "JPEG masks are lossy" in str(m)
  assert str(m).endswith("save masks as PNG or TIFF")
  m = message("colour_mask")
  assert m.reason == "colour_mask" and "RGB mask with differing channels (2 colours" in str(m)


def test_build_records_skips_bad_examples(tmp_path, bundle, caplog):
  bad = _fault_folder(tmp_path / "d")
  examples = discovery.list_examples(tmp_path / "d")
  assert len(examples) == len(GOOD) + len(bad)
  cache_dir = tmp_path / "cache"
  with caplog.at_level(logging.WARNING):
    records, stats = _build(bundle, examples, cache_dir, skip_bad_examples=True)
  _assert_warned(caplog, {bad["corrupt"]: "unreadable", bad["truncated"]: "unreadable",
                          bad["size_mismatch"]: "size_mismatch",
                          bad["bad_mask_values"]: "bad_mask_values",
                          bad["lossy_mask"]: "lossy_mask", bad["colour_mask"]: "colour_mask"})
  assert stats.skipped == SKIPPED and stats.num_skipped == len(bad)
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
  assert len(_warnings(caplog)) == len(bad)
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


# ----------------------------------------------------------------------------- 9. lossy masks


def _lossy_error(path: Path, fmt: str = "JPEG") -> str:
  with pytest.raises(discovery.ExampleError) as e:
    reading.read_mask(path)
  _assert_one_line_error(e.value, path)
  assert e.value.reason == discovery.LOSSY_MASK == "lossy_mask"
  assert f": {fmt} masks " in str(e.value) and str(e.value).endswith(
      "; save masks as PNG or TIFF")
  return str(e.value)


def test_jpeg_mask_is_refused_with_its_value_count(tmp_path):
  path = tmp_path / "m.jpg"
  Image.fromarray(_mask()).save(path, quality=75)
  with Image.open(path) as im:
    assert im.format == "JPEG"
    n = len(np.unique(np.asarray(im)))
  assert n > 2  # the trap: {0, 255} became many values
  assert _lossy_error(path) == (
      f"{path}: JPEG masks are lossy (compression turns a binary {{0, 255}} mask into many "
      f"values, which would be read as instance labels; this file has {n} distinct values); "
      "save masks as PNG or TIFF")


def test_jpeg_mask_is_refused_by_content_and_by_extension(tmp_path):
  # JPEG content under a .png name; PNG content under .jpeg / .JPG names.
  Image.fromarray(_mask()).save(tmp_path / "content.png", format="JPEG")
  Image.fromarray(_mask()).save(tmp_path / "ext.jpeg", format="PNG")
  Image.fromarray(_mask()).save(tmp_path / "ext.JPG", format="PNG")
  _lossy_error(tmp_path / "content.png")
  assert "this file has 2 distinct values" in _lossy_error(tmp_path / "ext.jpeg")
  _lossy_error(tmp_path / "ext.JPG")
  # An RGB JPEG mask too (lossy comes first: it is the fix to make).
  rgb = np.repeat(_mask()[..., None], 3, axis=-1)
  Image.fromarray(rgb).save(tmp_path / "rgb.jpg")
  _lossy_error(tmp_path / "rgb.jpg")
  # Images may be JPEG.
  Image.fromarray(_image()).save(tmp_path / "image.jpg")
  assert reading.read_image(tmp_path / "image.jpg").shape == (H, W, 3)


def test_webp_mask_is_refused(tmp_path):
  path = tmp_path / "m.png"
  Image.fromarray(_mask()).save(path, format="WEBP", lossless=True)
  assert "WebP masks may be lossy" in _lossy_error(path, "WebP")


def test_jpeg_compressed_tiff_mask_is_refused(tmp_path):
  # Written uncompressed, then the Compression tag set to JPEG (7): found from the
  # header, before (and without) decoding.
  path = tmp_path / "m.tif"
  tifffile.imwrite(path, _mask())
  with tifffile.TiffFile(path) as tif:
    offset = tif.pages[0].tags["Compression"].valueoffset
  data = bytearray(path.read_bytes())
  data[offset:offset + 2] = (7).to_bytes(2, "little")
  path.write_bytes(bytes(data))
  message = _lossy_error(path)
  assert "distinct values" not in message  # it does not decode here


def test_lossy_mask_is_skipped_and_counted(tmp_path, bundle, caplog):
  _pair(tmp_path / "d", "a")
  _pair(tmp_path / "d", "b")
  jpg = tmp_path / "d" / "masks" / "b.jpg"
  (tmp_path / "d" / "masks" / "b.png").unlink()
  Image.fromarray(_mask()).save(jpg)
  examples = discovery.list_examples(tmp_path / "d")
  with pytest.raises(discovery.ExampleError) as e:
    _build(bundle, examples, tmp_path / "cache")
  _assert_one_line_error(e.value, jpg)
  with caplog.at_level(logging.WARNING):
    records, stats = _build(bundle, examples, tmp_path / "cache", skip_bad_examples=True)
  assert [r.example.stem for r in records] == ["a"]
  assert stats.skipped == {"lossy_mask": 1}
  _assert_warned(caplog, {jpg: "lossy_mask"})


# ----------------------------------------------------------------------------- 10. colour masks


def test_colour_masks(tmp_path):
  g = np.zeros((H, W), np.uint8)
  g[2:8, 2:10], g[12:20, 2:10] = 1, 2
  gray3 = np.repeat(g[..., None], 3, axis=-1)
  Image.fromarray(g).save(tmp_path / "gray.png")
  Image.fromarray(gray3).save(tmp_path / "rgb_equal.png")
  Image.fromarray(np.dstack([gray3, np.full((H, W), 255, np.uint8)]), mode="RGBA").save(
      tmp_path / "rgba_opaque.png")
  tifffile.imwrite(tmp_path / "rgb_equal16.tif", gray3.astype(np.uint16) * 300,
                   photometric="rgb")
  expected = g.astype(np.int32)
  for name in ("gray.png", "rgb_equal.png", "rgba_opaque.png"):
    np.testing.assert_array_equal(reading.read_mask(tmp_path / name), expected, err_msg=name)
  np.testing.assert_array_equal(reading.read_mask(tmp_path / "rgb_equal16.tif"), expected * 300)

  red = np.zeros((H, W, 3), np.uint8)
  red[g > 0] = (255, 0, 0)  # two objects painted red on black
  Image.fromarray(red).save(tmp_path / "red.png")
  translucent = np.dstack([gray3, np.where(g > 0, 255, 0).astype(np.uint8)])
  Image.fromarray(translucent, mode="RGBA").save(tmp_path / "translucent.png")
  tifffile.imwrite(tmp_path / "red.tif", red, photometric="rgb")
  for name, what in (("red.png", "RGB mask with differing channels (2 colours: "
                                 "colour-coded objects?)"),
                     ("red.tif", "RGB mask with differing channels (2 colours"),
                     ("translucent.png", "RGBA mask with varying alpha")):
    with pytest.raises(discovery.ExampleError) as e:
      reading.read_mask(tmp_path / name)
    _assert_one_line_error(e.value, tmp_path / name)
    assert e.value.reason == "colour_mask"
    assert str(e.value).startswith(f"{tmp_path / name}: {what}")
    assert str(e.value).endswith("; save one channel of integer labels (0 = background, "
                                 "1..N = objects), e.g. a grayscale or 16-bit PNG")


# ----------------------------------------------------------------------------- 11. binary hint


def _regions(n: int) -> np.ndarray:
  m = np.zeros((H, W), np.uint8)
  for k in range(n):
    m[2:5, 1 + 4 * k:3 + 4 * k] = 255  # n separate 3x2 blocks
  return m


def _hints(caplog) -> list[str]:
  return [l for l in _warnings(caplog) if l.startswith("hint: ")]


@pytest.fixture(name="fresh_hints")
def _fresh_hints(monkeypatch):
  monkeypatch.setattr(reading, "_HINTS_GIVEN", set())


@pytest.mark.usefixtures("fresh_hints")
def test_many_region_binary_mask_hints_once(tmp_path, caplog):
  for name, n in (("three.png", 3), ("four.png", 4), ("seven.png", 7)):
    Image.fromarray(_regions(n)).save(tmp_path / name)
  labels = np.zeros((H, W), np.uint8)
  for k in range(6):
    labels[2:5, 1 + 4 * k:3 + 4 * k] = k + 1  # instance labels: no hint
  Image.fromarray(labels).save(tmp_path / "labels.png")
  with caplog.at_level(logging.WARNING):
    reading.read_mask(tmp_path / "labels.png")
    reading.read_mask(tmp_path / "three.png")  # below BINARY_HINT_REGIONS
    reading.read_mask(tmp_path / "seven.png", binary_components=True)  # already split
    assert _hints(caplog) == []
    out = reading.read_mask(tmp_path / "four.png")
    reading.read_mask(tmp_path / "seven.png")
    reading.read_mask(tmp_path / "four.png")
  np.testing.assert_array_equal(reading.object_ids(out), [1])  # still one object
  assert _hints(caplog) == [
      f"hint: {tmp_path / 'four.png'} is a binary mask with 4 separate regions read as ONE "
      "object; if they are separate objects, pass --binary_components (shown once)"]
  assert all(r.name == "tff_sam.data.reading" for r in caplog.records
             if r.getMessage().startswith("hint: "))


@pytest.mark.usefixtures("fresh_hints")
def test_hint_once_per_build(tmp_path, bundle, caplog):
  for stem in ("a", "b", "c"):
    _pair(tmp_path / "d", stem)
    Image.fromarray(_regions(5)).save(tmp_path / "d" / "masks" / f"{stem}.png")
  examples = discovery.list_examples(tmp_path / "d")
  with caplog.at_level(logging.WARNING):
    _build(bundle, examples, tmp_path / "cache", binary_components=True)
    assert _hints(caplog) == []
    records, _ = _build(bundle, examples, tmp_path / "cache")
  assert [r.num_objects for r in records] == [1, 1, 1]
  (hint,) = _hints(caplog)
  assert "a.png is a binary mask with 5 separate regions" in hint


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


def _thin_folder(root: Path) -> None:
  """3x96 and 96x3 images, each with one object at one end (its orientation shows)."""
  images, masks = _dirs(root)
  for stem, shape, obj in (("wide", (3, 96), np.s_[:, 80:90]), ("tall", (96, 3), np.s_[80:90, :])):
    Image.fromarray(_image(5, (*shape, 3))).save(images / f"{stem}.png")
    mask = np.zeros(shape, np.uint8)
    mask[obj] = 1
    Image.fromarray(mask).save(masks / f"{stem}.png")


def test_thin_images_keep_their_orientation_in_run_evaluate_and_predict(tmp_path, bundle):
  """The records `run` and `evaluate` build, `evaluate` itself and `predict`."""
  _thin_folder(tmp_path / "thin")
  examples = discovery.list_examples(tmp_path / "thin")
  records, stats = _build(bundle, examples, tmp_path / "cache")
  assert stats.encoded == 2 and [r.num_objects for r in records] == [1, 1]
  size = sam_lib.image_size(bundle.config)
  for record in records:
    rec = cache.read_record(record.path, embedding_shape=sam_lib.embedding_shape(bundle.config),
                            input_size=size)
    wide = record.example.stem == "wide"
    assert tuple(rec["original_size"]) == ((3, 96) if wide else (96, 3))
    box = np.asarray(rec["boxes"][0]) * 96 / size  # Back to pixels: the object's end.
    np.testing.assert_allclose(box, [80, 0, 89, 2] if wide else [0, 80, 2, 89], atol=0.5)
  result = heldout.evaluate_folder(model="tiny", data_dir=str(tmp_path / "thin"), split="all",
                                   eval_prompts=("box",), cache_dir=str(tmp_path / "cache"))
  assert result["results"]["box"]["num_objects"] == 2
  for example in examples:
    mask = tmp_path / f"{example.stem}_mask.png"
    inference.predict_paths(model="tiny", image=str(example.image_path),
                            boxes=[[0, 0, 3, 3]], points=[], output=str(tmp_path / "o.png"),
                            mask_out=str(mask))
    assert cv2.imread(str(mask), cv2.IMREAD_UNCHANGED).shape == reading.read_image(
        example.image_path).shape[:2]


def test_too_thin_image_is_one_line_or_skipped(tmp_path, bundle, caplog):
  images, masks = _dirs(tmp_path / "data")
  _pair(tmp_path / "data", "good", seed=1)
  Image.fromarray(_image(6, (1, 3000, 3))).save(images / "line.png")
  Image.fromarray(np.ones((1, 3000), np.uint8)).save(masks / "line.png")
  examples = discovery.list_examples(tmp_path / "data")
  with pytest.raises(errors.DataError) as info:
    _build(bundle, examples, tmp_path / "cache")
  _assert_one_line_error(info.value, images / "line.png")
  assert "is 3000x1 pixels: too thin for SAM" in str(info.value)
  with caplog.at_level(logging.WARNING, logger="tff_sam.data"):
    records, stats = _build(bundle, examples, tmp_path / "cache", skip_bad_examples=True)
  assert [r.example.stem for r in records] == ["good"]
  assert stats.skipped == {discovery.TOO_THIN: 1}
  _assert_warned(caplog, {images / "line.png": discovery.TOO_THIN})
  with pytest.raises(errors.DataError, match=f"^{images / 'line.png'}: is 3000x1 pixels"):
    inference.predict_paths(model="tiny", image=str(images / "line.png"), boxes=[[0, 0, 9, 1]],
                            points=[], output=str(tmp_path / "o.png"))
