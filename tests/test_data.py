"""Tests for tff_sam.data: discovery, partitioning, hold-out, readers and user errors."""

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from tff_sam.data import discovery
from tff_sam.data import reading
from tff_sam import errors


# ----------------------------------------------------------------------------- helpers


def _write_pair(folder: Path, stem: str, *, size=(12, 16), value: int = 0) -> None:
  """A small RGB PNG image and a binary PNG mask with a square object."""
  h, w = size
  (folder / "images").mkdir(parents=True, exist_ok=True)
  (folder / "masks").mkdir(parents=True, exist_ok=True)
  image = np.full((h, w, 3), value % 256, np.uint8)
  mask = np.zeros((h, w), np.uint8)
  mask[2:6, 3:8] = 255
  Image.fromarray(image).save(folder / "images" / f"{stem}.png")
  Image.fromarray(mask).save(folder / "masks" / f"{stem}.png")


def _flat(root: Path, n: int, prefix: str = "img") -> list[str]:
  stems = [f"{prefix}_{i:03d}" for i in range(n)]
  for i, s in enumerate(stems):
    _write_pair(root, s, value=i)
  return stems


def _stems(examples) -> list[str]:
  # Checks that image and mask are paired by stem and that `Example.stem` is theirs.
  for e in examples:
    assert e.stem == e.image_path.stem == e.mask_path.stem, e
  return [e.stem for e in examples]


def _all_client_stems(splits: discovery.DatasetSplits) -> list[str]:
  return [s for exs in splits.clients.values() for s in _stems(exs)]


def _split(root, **kw):
  args = dict(partition="iid", num_clients=3, dirichlet_alpha=0.5, test_fraction=0.0, seed=0)
  args.update(kw)
  return discovery.discover_splits(root, **args)


def _as_dict(splits):
  return ({k: _stems(v) for k, v in splits.clients.items()}, _stems(splits.test))


def _assert_data_error(excinfo, path) -> None:
  assert isinstance(excinfo.value, errors.DataError)
  assert str(path) in str(excinfo.value), str(excinfo.value)
  assert excinfo.value.path == str(path)
  assert "\n" not in str(excinfo.value)


# ----------------------------------------------------------------------------- discovery


def test_list_examples_pairs_by_stem_sorted(tmp_path):
  for s in ("b", "a", "c"):
    _write_pair(tmp_path, s)
  # Mask may have a different (supported) extension than the image.
  (tmp_path / "masks" / "c.png").unlink()
  tifffile.imwrite(tmp_path / "masks" / "c.tif", np.zeros((12, 16), np.uint8))
  # Hidden files and unsupported extensions are ignored.
  (tmp_path / "images" / ".hidden.png").write_bytes(b"junk")
  (tmp_path / "images" / "notes.txt").write_text("x")
  examples = discovery.list_examples(tmp_path)
  assert _stems(examples) == ["a", "b", "c"]
  for ex in examples:
    assert ex.image_path == tmp_path / "images" / f"{ex.image_path.stem}.png"
  assert examples[2].mask_path == tmp_path / "masks" / "c.tif"


def test_example_stem_is_file_stem(tmp_path):
  for s in ("b", "a", "c"):
    _write_pair(tmp_path, s)
  examples = discovery.list_examples(tmp_path)
  assert [e.stem for e in examples] == ["a", "b", "c"]
  assert all(e.stem == e.image_path.stem for e in examples)
  # Clients' examples and the test set are in stem order.
  _flat(tmp_path / "flat", 20)
  s = _split(tmp_path / "flat", num_clients=2, test_fraction=0.25, seed=3)
  for exs in list(s.clients.values()) + [s.test]:
    assert _stems(exs) == sorted(_stems(exs))


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_flat_partition_disjoint_covering_deterministic(tmp_path, partition):
  stems = _flat(tmp_path, 23)
  kw = dict(partition=partition, num_clients=5, dirichlet_alpha=0.3, test_fraction=0.0)
  a = _split(tmp_path, seed=7, **kw)
  b = _split(tmp_path, seed=7, **kw)
  c = _split(tmp_path, seed=8, **kw)
  assert not a.natural
  assert sorted(a.clients) == [f"client_{i:03d}" for i in range(5)]
  got = _all_client_stems(a)
  assert sorted(got) == stems  # covers all ...
  assert len(got) == len(set(got))  # ... exactly once (disjoint)
  assert all(len(v) >= 1 for v in a.clients.values())
  assert a.num_train_examples == 23
  assert a.test == ()
  assert _as_dict(a) == _as_dict(b)
  assert _as_dict(a) != _as_dict(c)


def test_iid_shards_near_equal(tmp_path):
  _flat(tmp_path, 23)
  sizes = [len(v) for v in _split(tmp_path, num_clients=5).clients.values()]
  assert sorted(sizes) == [4, 4, 5, 5, 5]


def test_dirichlet_is_skewed_and_alpha_controls_skew(tmp_path):
  _flat(tmp_path, 60)
  def spread(alpha, seed):
    s = _split(tmp_path, partition="dirichlet", num_clients=4, dirichlet_alpha=alpha, seed=seed)
    sizes = [len(v) for v in s.clients.values()]
    assert sum(sizes) == 60 and min(sizes) >= 1
    return max(sizes) - min(sizes)
  skewed = [spread(0.1, seed) for seed in range(5)]
  even = [spread(1000.0, seed) for seed in range(5)]
  # iid shards differ by at most one image; alpha=0.1 is strongly quantity-skewed.
  assert min(skewed) > 10, skewed
  assert max(even) <= 4, even


def test_dirichlet_tiny_alpha_every_client_nonempty(tmp_path):
  _flat(tmp_path, 8)
  for seed in range(10):
    s = _split(tmp_path, partition="dirichlet", num_clients=8, dirichlet_alpha=0.01, seed=seed)
    assert [len(v) for v in s.clients.values()] == [1] * 8


def test_flat_test_fraction_holdout(tmp_path):
  stems = _flat(tmp_path, 20)
  s = _split(tmp_path, num_clients=2, test_fraction=0.25, seed=3)
  train = _all_client_stems(s)
  test = _stems(s.test)
  assert len(test) == 5
  assert not set(train) & set(test)
  assert sorted(train + test) == stems
  again = _split(tmp_path, num_clients=2, test_fraction=0.25, seed=3)
  assert _as_dict(again) == _as_dict(s)
  other = _split(tmp_path, num_clients=2, test_fraction=0.25, seed=4)
  assert _stems(other.test) != test


def test_flat_test_folder_overrides_fraction(tmp_path):
  stems = _flat(tmp_path, 6)
  test_stems = _flat(tmp_path / "test", 3, prefix="held")
  s = _split(tmp_path, num_clients=2, test_fraction=0.5)
  assert _stems(s.test) == test_stems
  assert sorted(_all_client_stems(s)) == stems  # nothing else held out
  for ex in s.test:
    assert ex.image_path.parent == tmp_path / "test" / "images"
  assert list(s.test_clients) == ["test"]


def test_flat_holdout_is_one_evaluation_client(tmp_path):
  _flat(tmp_path, 6)
  s = _split(tmp_path, num_clients=2, test_fraction=0.5)
  assert list(s.test_clients) == ["test"] and len(s.test) == 3


def test_per_site_test_folders_are_evaluation_clients(tmp_path):
  _flat(tmp_path / "hospital_a", 3, prefix="a")
  held_b = _flat(tmp_path / "test" / "hospital_b", 2, prefix="b")
  held_c = _flat(tmp_path / "test" / "hospital_c", 1, prefix="c")
  (tmp_path / "test" / "notes").mkdir()
  s = _split(tmp_path, test_fraction=0.5)
  assert list(s.clients) == ["hospital_a"]
  assert {k: _stems(v) for k, v in s.test_clients.items()} == {
      "hospital_b": held_b, "hospital_c": held_c}
  assert _stems(s.test) == held_b + held_c


def test_test_folder_without_layout_is_an_error(tmp_path):
  _flat(tmp_path / "hospital_a", 3, prefix="a")
  (tmp_path / "test" / "stuff").mkdir(parents=True)
  with pytest.raises(errors.DataError, match="test.*no images/ and masks/"):
    _split(tmp_path)


def test_natural_layout_sites_are_clients(tmp_path):
  site_stems = {}
  for site, n in (("hospital_b", 3), ("hospital_a", 5)):
    site_stems[site] = _flat(tmp_path / site, n, prefix=site)
  (tmp_path / "notes").mkdir()  # A folder without images/ or masks/ is not a site.
  test_stems = _flat(tmp_path / "test", 2, prefix="t")
  s = _split(tmp_path, num_clients=10, test_fraction=0.4)  # both ignored here
  assert s.natural
  assert list(s.clients) == ["hospital_a", "hospital_b"]
  for site, exs in s.clients.items():
    assert _stems(exs) == site_stems[site]
    assert all(e.image_path.parent == tmp_path / site / "images" for e in exs)
  assert _stems(s.test) == test_stems


def test_natural_layout_holdout_from_every_site(tmp_path):
  site_stems = {site: _flat(tmp_path / site, n, prefix=site)
                for site, n in (("s0", 10), ("s1", 5), ("s2", 1))}
  s = _split(tmp_path, test_fraction=0.2, seed=1)
  assert s.natural
  test = _stems(s.test)
  assert sum(t.startswith("s0") for t in test) == 2
  assert sum(t.startswith("s1") for t in test) == 1
  assert _stems(s.clients["s2"]) == ["s2_000"]  # a single image is never held out
  assert list(s.test_clients) == ["s0", "s1"]  # each site's held-out images
  for site, stems in site_stems.items():
    train = _stems(s.clients[site])
    assert not set(train) & set(test)
    assert sorted(train + [t for t in test if t.startswith(site + "_")]) == stems


def test_validation_holds_out_of_each_site_apart_from_test_and_training(tmp_path):
  """`--validation_fraction`: each site's share, never its only image, disjoint from
  its training and the test images; the test split does not move; same seed, same
  split; the chosen clients and the pooled client keep their validation images."""
  site_stems = {site: _flat(tmp_path / site, n, prefix=site)
                for site, n in (("s0", 10), ("s1", 5), ("s2", 3), ("s3", 1))}
  plain = _split(tmp_path, test_fraction=0.2, seed=1)
  s = discovery.hold_out_validation(plain, fraction=0.25, seed=1)
  assert s.test_clients == plain.test_clients
  assert {c: len(v) for c, v in s.validation.items()} == {"s0": 2, "s1": 1, "s2": 1}
  test = set(_stems(s.test))
  for site, stems in site_stems.items():
    train, val = set(_stems(s.clients[site])), set(_stems(s.validation.get(site, ())))
    assert not train & val and not val & test and train
    assert sorted(train | val | {t for t in test if t.startswith(site + "_")}) == stems
  assert s == discovery.hold_out_validation(plain, fraction=0.25, seed=1)
  assert s.validation != discovery.hold_out_validation(plain, fraction=0.25, seed=2).validation
  assert discovery.hold_out_validation(plain, fraction=0.0, seed=1) is plain
  chosen = discovery.select_clients(s, train_clients=("s1", "s3"))
  assert list(chosen.validation) == ["s1"] and chosen.validation["s1"] == s.validation["s1"]
  pooled = discovery.select_clients(s, pool=True)
  assert list(pooled.validation) == [discovery.POOLED_CLIENT]
  assert set(pooled.validation[discovery.POOLED_CLIENT]) == {
      e for v in s.validation.values() for e in v}


def test_val_folder_is_each_sites_validation_and_never_trained_or_tested(tmp_path):
  """A `val/` folder: `val/<site>/` validates that site (not every site needs one);
  its images are not training sites, not held out for testing, and `select_clients`
  keeps them with their site."""
  for site, n in (("s0", 4), ("s1", 3)):
    _flat(tmp_path / site, n, prefix=site)
  val = {"s0": _flat(tmp_path / "val" / "s0", 2, prefix="v0")}
  s = _split(tmp_path, test_fraction=0.25, seed=1)
  assert list(s.clients) == ["s0", "s1"]  # val/ is no site.
  assert {c: _stems(v) for c, v in s.validation.items()} == val
  assert not set(val["s0"]) & (set(_stems(s.test)) | set(_all_client_stems(s)))
  assert len(s.test) == 2 and len(_all_client_stems(s)) == 5  # All 7 site images.
  assert discovery.hold_out_validation(s, fraction=0.0, seed=1) == s
  assert discovery.select_clients(s, train_clients=("s1",)).validation == {}


def test_flat_val_folder_is_split_over_the_flat_clients_by_seed(tmp_path):
  _flat(tmp_path, 9)
  val = _flat(tmp_path / "val", 5, prefix="v")
  s = _split(tmp_path, num_clients=3, seed=4)
  assert sorted(len(v) for v in s.validation.values()) == [1, 2, 2]
  assert sorted(e for v in s.validation.values() for e in _stems(v)) == val
  assert s == _split(tmp_path, num_clients=3, seed=4)
  assert any(_split(tmp_path, num_clients=3, seed=k).validation != s.validation
             for k in range(5, 9))


@pytest.mark.parametrize("layout", ["unknown_site", "flat_in_natural", "natural_in_flat"])
def test_val_folder_that_does_not_match_the_layout_is_one_error(tmp_path, layout):
  if layout == "natural_in_flat":
    _flat(tmp_path, 4)
    _flat(tmp_path / "val" / "s0", 1)
    bad = tmp_path / "val"
  else:
    _flat(tmp_path / "s0", 3)
    bad = tmp_path / "val" / ("s9" if layout == "unknown_site" else "")
    _flat(bad, 1)
    bad = bad if layout == "unknown_site" else tmp_path / "val"
  with pytest.raises(errors.DataError) as e:
    _split(tmp_path)
  _assert_data_error(e, bad)
  assert "\n" not in str(e.value) and "val/" in str(e.value)


def test_label_scarcity_keeps_nested_seeded_subsets_of_training_images_only(tmp_path):
  """`--labels_per_site=N`: N training images per site (all when it has fewer); a
  smaller N keeps a subset of a larger one's; the seed chooses; validation and test
  images stay."""
  for site, n in (("s0", 9), ("s1", 4), ("s2", 1)):
    _flat(tmp_path / site, n, prefix=site)
  full = discovery.hold_out_validation(_split(tmp_path, test_fraction=0.2, seed=3),
                                       fraction=0.2, seed=3)
  kept = {n: discovery.limit_labels(full, per_client=n, seed=3) for n in (1, 2, 4)}
  assert {c: len(v) for c, v in kept[2].clients.items()} == {"s0": 2, "s1": 2, "s2": 1}
  for small, large in ((1, 2), (2, 4)):
    for c in full.clients:
      assert set(kept[small].clients[c]) <= set(kept[large].clients[c]) <= set(full.clients[c])
  assert all(k.test_clients == full.test_clients and k.validation == full.validation
             for k in kept.values())
  assert discovery.limit_labels(full, per_client=0, seed=3) is full
  others = [discovery.limit_labels(full, per_client=2, seed=s).clients["s0"] for s in range(4, 9)]
  assert any(o != kept[2].clients["s0"] for o in others)


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_too_many_clients_is_config_error(tmp_path, partition):
  _flat(tmp_path, 5)
  with pytest.raises(errors.ConfigError) as e:
    _split(tmp_path, partition=partition, num_clients=5, test_fraction=0.2)
  assert "--num_clients" in str(e.value)
  assert e.value.flag == "num_clients"
  # Exactly as many clients as training images is fine.
  s = _split(tmp_path, partition=partition, num_clients=4, test_fraction=0.2)
  assert [len(v) for v in s.clients.values()] == [1, 1, 1, 1]


# ----------------------------------------------------------------------------- user errors


def test_missing_data_dir(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(errors.DataError) as e:
    _split(missing)
  _assert_data_error(e, missing)


def test_data_dir_without_known_layout(tmp_path):
  (tmp_path / "random").mkdir()
  with pytest.raises(errors.DataError) as e:
    _split(tmp_path)
  _assert_data_error(e, tmp_path)


def test_missing_masks_folder(tmp_path):
  _write_pair(tmp_path, "a")
  for p in (tmp_path / "masks").iterdir():
    p.unlink()
  (tmp_path / "masks").rmdir()
  with pytest.raises(errors.DataError) as e:
    _split(tmp_path, num_clients=1)
  _assert_data_error(e, tmp_path / "masks")


def test_empty_images_folder(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "masks").mkdir()
  with pytest.raises(errors.DataError) as e:
    _split(tmp_path, num_clients=1)
  _assert_data_error(e, tmp_path / "images")


@pytest.mark.parametrize("folder", ["images", "masks"])
def test_file_without_partner(tmp_path, folder):
  """An image without a mask, or a mask without an image."""
  _flat(tmp_path, 2)
  (tmp_path / folder / "orphan.png").write_bytes(
      (tmp_path / folder / "img_000.png").read_bytes())
  with pytest.raises(errors.DataError) as e:
    _split(tmp_path, num_clients=1)
  _assert_data_error(e, tmp_path / folder / "orphan.png")


def test_image_without_mask_in_a_site(tmp_path):
  _flat(tmp_path / "site_a", 2)
  _flat(tmp_path / "site_b", 2)
  (tmp_path / "site_b" / "masks" / "img_001.png").unlink()
  with pytest.raises(errors.DataError) as e:
    _split(tmp_path)
  _assert_data_error(e, tmp_path / "site_b" / "images" / "img_001.png")


def test_duplicate_stems(tmp_path):
  _flat(tmp_path, 2)
  tifffile.imwrite(tmp_path / "images" / "img_001.tif", np.zeros((12, 16), np.uint8))
  with pytest.raises(errors.DataError) as e:
    discovery.list_examples(tmp_path)
  _assert_data_error(e, tmp_path / "images" / "img_001.tif")
  assert "img_001.png" in str(e.value)


def test_truncated_png(tmp_path):
  _write_pair(tmp_path, "a", size=(64, 64))
  path = tmp_path / "images" / "a.png"
  img = np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)
  Image.fromarray(img).save(path)
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2])
  with pytest.raises(errors.DataError) as e:
    reading.read_image(path)
  _assert_data_error(e, path)
  ex = discovery.list_examples(tmp_path)[0]
  with pytest.raises(errors.DataError) as e:
    reading.load_example(ex)
  _assert_data_error(e, path)


@pytest.mark.parametrize("name", ["junk.png", "junk.tif", "junk.jpg"])
def test_garbage_file(tmp_path, name):
  path = tmp_path / name
  path.write_bytes(b"this is not an image\n" * 10)
  with pytest.raises(errors.DataError) as e:
    reading.read_image(path)
  _assert_data_error(e, path)
  with pytest.raises(errors.DataError) as e:
    reading.read_mask(path)
  _assert_data_error(e, path)


def test_size_mismatch(tmp_path):
  _write_pair(tmp_path, "a", size=(12, 16))
  mask_path = tmp_path / "masks" / "a.png"
  Image.fromarray(np.zeros((16, 12), np.uint8)).save(mask_path)
  ex = discovery.list_examples(tmp_path)[0]
  with pytest.raises(errors.DataError) as e:
    reading.load_example(ex)
  _assert_data_error(e, mask_path)
  assert "16x12" in str(e.value) and "12x16" in str(e.value)


def test_stack_tiff_as_image(tmp_path):
  path = tmp_path / "stack.tif"
  tifffile.imwrite(path, np.zeros((5, 20, 24), np.uint16))
  with pytest.raises(errors.DataError) as e:
    reading.read_image(path)
  _assert_data_error(e, path)


def test_stack_tiff_as_mask(tmp_path):
  path = tmp_path / "stack.tif"
  tifffile.imwrite(path, np.zeros((5, 20, 24), np.uint16))
  with pytest.raises(errors.DataError) as e:
    reading.read_mask(path)
  _assert_data_error(e, path)


@pytest.mark.parametrize("values", [np.array([[0.0, 0.5]]), np.array([[0.0, np.nan]]),
                                    np.array([[0, -3]])])
def test_bad_mask_values(tmp_path, values):
  path = tmp_path / "m.tif"
  tifffile.imwrite(path, values.astype(np.float32 if values.dtype.kind == "f" else np.int16))
  with pytest.raises(errors.DataError) as e:
    reading.read_mask(path)
  _assert_data_error(e, path)


# ----------------------------------------------------------------------------- image reader


def _rng_image(shape, dtype=np.uint8, seed=0):
  rng = np.random.default_rng(seed)
  hi = np.iinfo(dtype).max
  return rng.integers(0, hi, size=shape, endpoint=True).astype(dtype)


def test_read_gray8_png(tmp_path):
  a = _rng_image((10, 14))
  path = tmp_path / "g.png"
  Image.fromarray(a).save(path)
  out = reading.read_image(path)
  assert out.dtype == np.uint8 and out.shape == (10, 14, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], a)


def test_read_rgb8_png_and_tiff(tmp_path):
  a = _rng_image((10, 14, 3))
  png, tif = tmp_path / "c.png", tmp_path / "c.tif"
  Image.fromarray(a).save(png)
  tifffile.imwrite(tif, a, photometric="rgb")
  for path in (png, tif):
    out = reading.read_image(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("compression", ["lzw", "deflate"])
def test_compressed_tiffs_read_without_imagecodecs(tmp_path, compression):
  """LZW and deflate TIFFs (what Fiji, OpenCV and many microscopes write) need the
  `imagecodecs` package in tifffile, which is not installed: OpenCV's libtiff reads
  them, with the same arrays (RGB order, 16-bit labels kept)."""
  try:
    import imagecodecs  # pylint: disable=import-outside-toplevel,unused-import
    pytest.skip("imagecodecs is installed: tifffile decodes these itself")
  except ImportError:
    pass
  rgb, labels = _rng_image((12, 17, 3), seed=3), np.zeros((12, 17), np.uint16)
  labels[2:6, 3:9], labels[7:11, 10:15] = 1, 300
  flag = {"lzw": cv2.IMWRITE_TIFF_COMPRESSION_LZW,
          "deflate": cv2.IMWRITE_TIFF_COMPRESSION_DEFLATE}[compression]
  cv2.imwrite(str(tmp_path / "i.tif"), rgb[..., ::-1], [cv2.IMWRITE_TIFF_COMPRESSION, flag])
  cv2.imwrite(str(tmp_path / "m.tif"), labels, [cv2.IMWRITE_TIFF_COMPRESSION, flag])
  with tifffile.TiffFile(tmp_path / "m.tif") as tif:
    assert tif.pages[0].compression.name.lower().startswith(compression[:4])
  np.testing.assert_array_equal(reading.read_image(tmp_path / "i.tif"), rgb)
  np.testing.assert_array_equal(reading.read_mask(tmp_path / "m.tif"), labels)


def test_read_bgr_written_by_cv2_is_rgb(tmp_path):
  a = _rng_image((10, 14, 3), seed=1)
  path = tmp_path / "c.png"
  cv2.imwrite(str(path), a[..., ::-1])
  np.testing.assert_array_equal(reading.read_image(path), a)


def test_read_rgba_drops_alpha(tmp_path):
  a = _rng_image((10, 14, 4), seed=2)
  a[..., 3] = 0  # fully transparent: colour must still be the stored colour
  a[0, 0, 3] = 255
  path = tmp_path / "c.png"
  Image.fromarray(a, mode="RGBA").save(path)
  out = reading.read_image(path)
  assert out.shape == (10, 14, 3)
  np.testing.assert_array_equal(out, a[..., :3])


def test_read_palette_png(tmp_path):
  a = _rng_image((10, 14, 3), seed=3) // 64 * 64  # few colours
  path = tmp_path / "p.png"
  Image.fromarray(a).convert("P", palette=Image.ADAPTIVE, colors=64).save(path)
  np.testing.assert_array_equal(reading.read_image(path), a)


def _expected_percentile_scaling(a):
  lo, hi = np.percentile(a.astype(np.float64), reading.PERCENTILES)
  return np.clip(np.round((a.astype(np.float64) - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["tif", "png"])
def test_read_gray16_percentile_scaling(tmp_path, fmt):
  rng = np.random.default_rng(4)
  a = rng.integers(1000, 3000, size=(40, 50)).astype(np.uint16)
  a[0, 0] = 0        # outliers below the 1st ...
  a[0, 1] = 65535    # ... and above the 99.8th percentile are clipped
  path = tmp_path / f"g16.{fmt}"
  if fmt == "tif":
    tifffile.imwrite(path, a)
  else:
    assert cv2.imwrite(str(path), a)
  out = reading.read_image(path)
  assert out.dtype == np.uint8 and out.shape == (40, 50, 3)
  expected = _expected_percentile_scaling(a)
  np.testing.assert_array_equal(out[..., 0], expected)
  np.testing.assert_array_equal(out[..., 2], expected)
  assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255
  # The window uses the percentiles, not min/max: the bulk spans (almost) the full range.
  bulk = out[1:, :, 0]
  assert bulk.min() <= 5 and bulk.max() >= 250


def test_to_uint8_constant_and_bool():
  np.testing.assert_array_equal(reading.to_uint8(np.full((3, 3), 7, np.uint16)), np.zeros((3, 3)))
  np.testing.assert_array_equal(reading.to_uint8(np.eye(2, dtype=bool)), np.eye(2) * 255)
  a = _rng_image((4, 4))
  assert reading.to_uint8(a) is a


def test_read_channels_first_tiff(tmp_path):
  a = _rng_image((10, 14, 3), seed=5)
  path = tmp_path / "cf.tif"
  tifffile.imwrite(path, np.ascontiguousarray(np.moveaxis(a, -1, 0)), photometric="minisblack",
                   planarconfig="contig")
  assert tifffile.imread(path).shape == (3, 10, 14)
  np.testing.assert_array_equal(reading.read_image(path), a)


def test_read_single_channel_tiff(tmp_path):
  a = _rng_image((10, 14, 1), seed=6)
  path = tmp_path / "one.tif"
  tifffile.imwrite(path, a, photometric="minisblack")
  out = reading.read_image(path)
  np.testing.assert_array_equal(out, np.repeat(a, 3, axis=-1))


def test_read_rgb16_tiff_scaled(tmp_path):
  rng = np.random.default_rng(7)
  a = rng.integers(0, 4096, size=(12, 10, 3)).astype(np.uint16)
  path = tmp_path / "rgb16.tif"
  tifffile.imwrite(path, a, photometric="rgb")
  out = reading.read_image(path)
  np.testing.assert_array_equal(out, _expected_percentile_scaling(a))


# ----------------------------------------------------------------------------- mask reader


def _two_squares():
  m = np.zeros((20, 20), np.uint8)
  m[2:6, 2:6] = 255
  m[10:15, 12:18] = 255
  m[6, 6] = 255  # touches the first square diagonally: same 8-connected component
  return m


def test_binary_mask_is_one_object(tmp_path):
  m = _two_squares()
  path = tmp_path / "m.png"
  Image.fromarray(m).save(path)
  out = reading.read_mask(path)
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, (m > 0).astype(np.int32))
  np.testing.assert_array_equal(reading.object_ids(out), [1])


def test_binary_mask_components(tmp_path):
  m = _two_squares()
  path = tmp_path / "m.png"
  Image.fromarray(m).save(path)
  out = reading.read_mask(path, binary_components=True)
  np.testing.assert_array_equal(reading.object_ids(out), [1, 2])
  np.testing.assert_array_equal(out > 0, m > 0)
  assert out[2, 2] == out[6, 6] != out[12, 14]
  assert len(np.unique(out[2:6, 2:6])) == 1 and len(np.unique(out[10:15, 12:18])) == 1


def test_binary_mask_other_foreground_value(tmp_path):
  m = (_two_squares() > 0).astype(np.uint8)  # {0, 1}
  path = tmp_path / "m.tif"
  tifffile.imwrite(path, m)
  np.testing.assert_array_equal(reading.read_mask(path), m)
  assert len(reading.object_ids(reading.read_mask(path, binary_components=True))) == 2


def test_instance_labels_binary_components_ignored(tmp_path):
  m = np.zeros((10, 10), np.uint8)
  m[0:2, 0:2] = 3
  m[5:7, 5:7] = 3  # two pieces of one instance
  m[8:10, 0:3] = 9
  path = tmp_path / "m.png"
  Image.fromarray(m).save(path)
  out = reading.read_mask(path, binary_components=True)
  np.testing.assert_array_equal(out, m.astype(np.int32))


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_instance_labels_above_255_preserved(tmp_path, fmt):
  m = np.zeros((16, 16), np.uint16)
  m[0:4, 0:4] = 300
  m[5:9, 5:9] = 1000
  m[10:14, 10:14] = 60000
  m[14:16, 0:2] = 256
  path = tmp_path / f"m.{fmt}"
  if fmt == "png":
    assert cv2.imwrite(str(path), m)
  else:
    tifffile.imwrite(path, m)
  out = reading.read_mask(path)
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, m.astype(np.int32))
  np.testing.assert_array_equal(reading.object_ids(out), [256, 300, 1000, 60000])


def _gray_labels() -> np.ndarray:
  g = np.zeros((8, 8), np.uint8)
  g[1:3, 1:3] = 4
  g[5:7, 5:7] = 7
  return g


def _colour_error(path: Path) -> discovery.ExampleError:
  with pytest.raises(discovery.ExampleError) as e:
    reading.read_mask(path)
  assert e.value.reason == discovery.COLOUR_MASK == "colour_mask"
  assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
  assert "save one channel of integer labels (0 = background, 1..N = objects)" in str(e.value)
  return e.value


def test_rgb_colour_coded_mask_is_refused(tmp_path):
  m = np.zeros((12, 12, 3), np.uint8)
  m[0:3, 0:3] = (255, 0, 0)
  m[4:7, 4:7] = (0, 255, 0)
  m[8:11, 8:11] = (255, 0, 0)
  m[0:3, 8:11] = (10, 20, 30)
  path = tmp_path / "m.png"
  Image.fromarray(m).save(path)
  e = _colour_error(path)
  assert str(e) == (
      f"{path}: RGB mask with differing channels (4 colours: colour-coded objects?); save "
      "one channel of integer labels (0 = background, 1..N = objects), e.g. a grayscale or "
      "16-bit PNG")


def test_red_on_black_mask_is_refused(tmp_path):
  # Before: read as ONE object per image (one colour besides black), silently.
  m = np.zeros((12, 12, 3), np.uint8)
  m[1:4, 1:4] = (255, 0, 0)
  m[7:10, 7:10] = (255, 0, 0)
  path = tmp_path / "nuclei.png"
  Image.fromarray(m).save(path)
  assert "RGB mask with differing channels (2 colours" in str(_colour_error(path))


def test_gray_rgb_mask_read_as_gray(tmp_path):
  g = _gray_labels()
  Image.fromarray(g).save(tmp_path / "gray.png")
  Image.fromarray(np.repeat(g[..., None], 3, axis=-1)).save(tmp_path / "rgb.png")
  out = reading.read_mask(tmp_path / "rgb.png")
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, g.astype(np.int32))
  np.testing.assert_array_equal(out, reading.read_mask(tmp_path / "gray.png"))


@pytest.mark.parametrize("alpha", [255, 0, 128])
def test_rgba_gray_mask_with_constant_alpha_read_as_gray(tmp_path, alpha):
  g = _gray_labels()
  m = np.zeros((8, 8, 4), np.uint8)
  m[..., :3] = g[..., None]
  m[..., 3] = alpha
  path = tmp_path / "m.png"
  Image.fromarray(m, mode="RGBA").save(path)
  np.testing.assert_array_equal(reading.read_mask(path), g.astype(np.int32))


def test_rgba_mask_with_colours_is_refused(tmp_path):
  m = np.zeros((8, 8, 4), np.uint8)
  m[..., 3] = 255
  m[1:3, 1:3, :3] = (0, 0, 200)
  m[5:7, 5:7, :3] = (0, 200, 0)
  path = tmp_path / "m.png"
  Image.fromarray(m, mode="RGBA").save(path)
  assert "RGBA mask with differing channels (3 colours" in str(_colour_error(path))


def test_rgba_mask_drawn_as_transparency_is_refused(tmp_path):
  # Black everywhere, the objects only in alpha: before, silently an empty mask.
  m = np.zeros((8, 8, 4), np.uint8)
  m[2:5, 2:5, 3] = 255
  path = tmp_path / "m.png"
  Image.fromarray(m, mode="RGBA").save(path)
  assert "RGBA mask with varying alpha" in str(_colour_error(path))


def test_16bit_rgb_png_mask_keeps_16_bits(tmp_path):
  # Pillow alone reads 16-bit RGB PNGs as 8 bits (300 -> 1, 1000 -> 3).
  g = np.zeros((6, 6), np.uint16)
  g[0:2, 0:2], g[3:5, 3:5], g[0:2, 4:6] = 300, 1000, 301
  path = tmp_path / "m.png"
  assert cv2.imwrite(str(path), np.repeat(g[..., None], 3, axis=-1))
  np.testing.assert_array_equal(reading.read_mask(path), g.astype(np.int32))
  rgba = tmp_path / "rgba.png"
  m = np.full((6, 6, 4), 65535, np.uint16)
  m[..., :3] = g[..., None]
  assert cv2.imwrite(str(rgba), m)
  np.testing.assert_array_equal(reading.read_mask(rgba), g.astype(np.int32))
  coloured = tmp_path / "c.png"
  c = np.zeros((6, 6, 3), np.uint16)
  c[0:2, 0:2] = (300, 0, 0)  # BGR on disk: blue
  assert cv2.imwrite(str(coloured), c)
  assert "(2 colours" in str(_colour_error(coloured))


def test_16bit_rgb_png_image_is_scaled_not_truncated(tmp_path):
  a = np.zeros((8, 8, 3), np.uint16)
  a[..., 0] = np.arange(64, dtype=np.uint16).reshape(8, 8) * 64  # 12-bit data, 0..4032
  a[..., 2] = 4032  # red on disk (BGR): order must come back as RGB
  path = tmp_path / "i.png"
  assert cv2.imwrite(str(path), a)
  out = reading.read_image(path)
  assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
  # Scaled per image (percentile window), not the high byte (which would be <= 15).
  np.testing.assert_array_equal(out, reading.to_uint8(a[..., ::-1]))
  assert out.max() == 255 and out[..., 0].min() == 255


def test_palette_mask_reads_indices(tmp_path):
  idx = np.zeros((8, 8), np.uint8)
  idx[1:3, 1:3], idx[4:6, 4:6], idx[6:8, 0:2] = 1, 2, 5
  # A binary palette mask with Pillow's default palette (black only): before, silently
  # empty (index 1 has no colour, so it read as black).
  bare = tmp_path / "bare.png"
  Image.fromarray((idx == 1).astype(np.uint8), mode="P").save(bare)
  assert Image.open(bare).mode == "P"
  np.testing.assert_array_equal(reading.read_mask(bare), (idx == 1).astype(np.int32))
  # A VOC-style colour palette (index 0 black): index = label.
  voc = Image.fromarray(idx, mode="P")
  voc.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128])
  voc.save(tmp_path / "voc.png")
  np.testing.assert_array_equal(reading.read_mask(tmp_path / "voc.png"), idx.astype(np.int32))
  # A gray image saved as palette: the same labels as the gray file.
  Image.fromarray(idx).convert("P").save(tmp_path / "gray.png")
  assert Image.open(tmp_path / "gray.png").mode == "P"
  np.testing.assert_array_equal(reading.read_mask(tmp_path / "gray.png"), idx.astype(np.int32))
  # Palette images are still read as their colours.
  np.testing.assert_array_equal(reading.read_image(tmp_path / "voc.png")[5, 5], (0, 128, 0))


def test_palette_mask_with_black_not_at_index_0_is_refused(tmp_path):
  idx = np.ones((8, 8), np.uint8)  # index 1 (black) everywhere ...
  idx[2:5, 2:5] = 0  # ... and index 0 (red) for the object
  im = Image.fromarray(idx, mode="P")
  im.putpalette([255, 0, 0, 0, 0, 0])
  path = tmp_path / "m.png"
  im.save(path)
  e = _colour_error(path)
  assert "palette mask paints index 1 black but index 0 (read as the background) is " \
         "(255, 0, 0)" in str(e)


def test_load_example_reads_both(tmp_path):
  _write_pair(tmp_path, "a", size=(12, 16), value=77)
  image, labels = reading.load_example(discovery.list_examples(tmp_path)[0])
  assert image.shape == (12, 16, 3) and image.dtype == np.uint8 and (image == 77).all()
  assert labels.shape == (12, 16) and labels.sum() == 4 * 5
