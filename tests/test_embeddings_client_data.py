"""Tests for tff_sam.data.cache (the record cache) and tff_sam.data.pipeline (tf.data)."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tff_sam.data import cache
from tff_sam.data import discovery
from tff_sam.data import pipeline
from tff_sam.data import preprocess
from tff_sam.data import reading
from tff_sam.data import synthetic
from tff_sam.models import sam as sam_lib

PROMPTS = 5  # more than any synthetic image's object count (2..4)


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(name="dataset", scope="module")
def _dataset(tmp_path_factory):
  root = synthetic.generate(tmp_path_factory.mktemp("data") / "synthetic",
                            images_per_site=2, test_per_site=1, seed=3)
  return root


def _examples(root: Path) -> list[discovery.Example]:
  out = []
  for folder in ("site_0", "site_1", "site_2", "test"):
    out.extend(discovery.list_examples(root / folder))
  return out


class _CountingBundle:
  """A copy of a bundle whose encoder counts the images it encodes."""

  def __init__(self, bundle):
    self.bundle = dataclasses.replace(bundle)
    self.images = 0
    inner = bundle.encoder_fn

    def encoder_fn():
      encode = inner()

      def counted(px):
        self.images += int(px.shape[0])
        return encode(px)
      return counted
    self.bundle.encoder_fn = encoder_fn


def _build(bundle, examples, cache_root, **kw):
  args = dict(bundle=bundle, cache_root=cache_root, binary_components=False, batch_size=4,
              show_progress=False)
  args.update(kw)
  return cache.build_records(examples, **args)


@pytest.fixture(name="built", scope="module")
def _built(bundle, dataset, tmp_path_factory):
  cache_dir = tmp_path_factory.mktemp("cache")
  counting = _CountingBundle(bundle)
  examples = _examples(dataset)
  records, stats = _build(counting.bundle, examples, cache_dir)
  return dict(cache_dir=cache_dir, examples=examples, records=records, stats=stats,
              encoded_images=counting.images)


def _record_dir(cache_dir, bundle) -> Path:
  return Path(cache_dir) / "embeddings" / bundle.fingerprint


def _read(bundle, path):
  return cache.read_record(path, embedding_shape=sam_lib.embedding_shape(bundle.config),
                                input_size=sam_lib.image_size(bundle.config))


# ----------------------------------------------------------------------------- records


def test_build_records_encodes_each_image_once(built, bundle):
  n = len(built["examples"])
  assert n == 9
  stats = built["stats"]
  assert (stats.images, stats.encoded, stats.reused) == (n, n, 0)
  assert built["encoded_images"] == n
  paths = [r.path for r in built["records"]]
  assert len(set(paths)) == n
  assert all(p.parent == _record_dir(built["cache_dir"], bundle) for p in paths)
  assert all(p.is_file() and p.suffix == ".tfrecord" for p in paths)
  assert stats.objects == sum(r.num_objects for r in built["records"])
  assert stats.objects >= 2 * n - stats.objects_too_small
  assert stats.images_without_objects == sum(r.num_objects == 0 for r in built["records"])
  # Nothing temporary is left behind.
  assert not [p for p in _record_dir(built["cache_dir"], bundle).iterdir() if p.name.startswith(".")]


def test_one_compiled_encoder_for_the_whole_run(bundle, dataset, tmp_path):
  """Every build_records call (one per site, the test set) uses one traced function."""
  fn = bundle.encoder_fn()
  assert bundle.encoder_fn() is fn
  before = fn.experimental_get_tracing_count()
  for site in ("site_0", "site_1"):
    cache.build_records(discovery.list_examples(dataset / site), bundle=bundle,
                        cache_root=tmp_path / site, binary_components=False, batch_size=2,
                        show_progress=False)
  assert fn.experimental_get_tracing_count() == max(before, 1)


def test_second_call_reuses(built, bundle):
  counting = _CountingBundle(bundle)
  records, stats = _build(counting.bundle, built["examples"], built["cache_dir"])
  assert (stats.images, stats.encoded, stats.reused) == (9, 0, 9)
  assert counting.images == 0
  assert records == built["records"]
  assert stats.objects == built["stats"].objects


def test_changed_files_and_settings_give_new_records(bundle, dataset, tmp_path):
  root = tmp_path / "data"
  shutil.copytree(dataset, root)
  cache_dir = tmp_path / "cache"
  examples = discovery.list_examples(root / "site_1")
  first, stats = _build(bundle, examples, cache_dir)
  assert stats.encoded == 2
  # Remove one object from the first mask.
  mask_path = examples[0].mask_path
  labels = reading.read_mask(mask_path)
  drop = reading.object_ids(labels)[0]
  raw = np.asarray(Image.open(mask_path))
  raw = np.where(labels == drop, 0, raw).astype(raw.dtype)
  Image.fromarray(raw).save(mask_path)
  counting = _CountingBundle(bundle)
  second, stats = _build(counting.bundle, examples, cache_dir)
  assert (stats.encoded, stats.reused) == (1, 1)
  assert counting.images == 1
  assert second[0].path != first[0].path and second[1] == first[1]
  assert first[0].path.exists()  # the old record is not overwritten
  assert second[0].num_objects == first[0].num_objects - 1
  old, new = _read(bundle, first[0].path), _read(bundle, second[0].path)
  assert (new["labels"] > 0).sum() < (old["labels"] > 0).sum()
  # A changed image also gives a new record.
  img = np.asarray(Image.open(examples[1].image_path)).copy()
  img[0, 0] ^= 0xFF
  Image.fromarray(img).save(examples[1].image_path)
  third, stats = _build(bundle, examples, cache_dir)
  assert (stats.encoded, stats.reused) == (1, 1)
  assert third[1].path != second[1].path and third[0] == second[0]
  # So does a different mask interpretation.
  fourth, stats = _build(bundle, examples, cache_dir, binary_components=True)
  assert stats.encoded == 2
  assert {r.path for r in fourth}.isdisjoint({r.path for r in third})


def _expected_embedding(bundle, image):
  feats = bundle.processor(images=image, return_tensors="np")
  px = tf.constant(feats["pixel_values"].astype(np.float32))
  return bundle.sam.get_image_embeddings(px).numpy()[0]


def test_records_round_trip(built, bundle):
  config = bundle.config
  side = sam_lib.image_size(config)
  for ex, record in zip(built["examples"], built["records"]):
    rec = _read(bundle, record.path)
    image, labels = reading.load_example(ex)
    want = _expected_embedding(bundle, image)
    assert rec["embedding"].shape == sam_lib.embedding_shape(config)
    assert rec["embedding"].dtype == np.float32
    np.testing.assert_allclose(rec["embedding"], want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    # Labels in the input frame, objects renumbered 1..K in id order, -1 padding.
    resized = preprocess.resize_labels(labels, longest_edge=side, pad_to=side)
    ids = reading.object_ids(labels)
    ids = ids[np.isin(ids, resized)]
    assert len(ids) == record.num_objects >= 1
    np.testing.assert_array_equal(rec["object_ids"], np.arange(1, len(ids) + 1))
    assert rec["labels"].shape == (side, side)
    np.testing.assert_array_equal(rec["labels"], cache.renumber(resized, ids))
    for new, old in enumerate(ids, start=1):
      np.testing.assert_array_equal(rec["labels"] == new, resized == old)
    np.testing.assert_array_equal(rec["labels"] == -1, resized == -1)
    boxes = preprocess.to_input_frame(preprocess.boxes_from_labels(labels, ids).reshape(-1, 2, 2),
                                      labels.shape, side).reshape(-1, 4)
    np.testing.assert_allclose(rec["boxes"], boxes, rtol=1e-6)
    assert tuple(rec["original_size"]) == labels.shape
    assert tuple(rec["reshaped_size"]) == preprocess.resized_shape(labels.shape, side)


def test_record_stem_is_image_stem(built, bundle):
  for ex, record in zip(built["examples"], built["records"]):
    assert _read(bundle, record.path)["stem"].decode() == ex.image_path.stem


def test_renumber_and_png_labels():
  labels = np.array([[-1, 0, 300], [70000, 300, 5]], np.int32)
  out = cache.renumber(labels, np.array([5, 300, 70000]))
  np.testing.assert_array_equal(out, [[-1, 0, 2], [3, 2, 1]])
  out = cache.renumber(labels, np.array([300]))  # unlisted ids become background
  np.testing.assert_array_equal(out, [[-1, 0, 1], [0, 1, 0]])
  big = np.full((3, 3), 65534, np.int32)
  big[0, 0] = -1
  png = cache.encode_labels(big)
  decoded = tf.io.decode_png(png, channels=1, dtype=tf.uint16).numpy()[..., 0]
  np.testing.assert_array_equal(np.where(decoded == cache.PNG_PAD, -1, decoded), big)
  with pytest.raises(ValueError):
    cache.encode_labels(np.full((2, 2), 65535, np.int32))


def test_stray_temp_files_are_ignored(built, bundle):
  out_dir = _record_dir(built["cache_dir"], bundle)
  victim = built["records"][0].path
  strays = [out_dir / ".x.tmp", out_dir / f".{victim.name}.abc123.tmp",
            out_dir / f".{victim.name}.old.tmp"]
  try:
    good = victim.read_bytes()
    for p in strays:
      p.write_bytes(good[:len(good) // 3])  # a partially written record
    records, stats = _build(bundle, built["examples"], built["cache_dir"])
    assert stats.reused == 9 and stats.encoded == 0
    assert all(not r.path.name.startswith(".") for r in records)
    manifest_dir = built["cache_dir"] / "manifests"
    cache.write_manifests(manifest_dir, {"c": records})
    listed = cache.manifest_records(manifest_dir / "c.txt")
    assert not [p for p in listed if Path(p).name.startswith(".")]
  finally:
    for p in strays:
      p.unlink(missing_ok=True)


def test_crash_while_writing_leaves_nothing_trusted(bundle, dataset, tmp_path, monkeypatch):
  examples = discovery.list_examples(dataset / "site_2")
  cache_dir = tmp_path / "cache"
  real_writer = tf.io.TFRecordWriter

  class CrashingWriter:
    """Writes half a record to the temporary file, then fails (e.g. disk full)."""

    def __init__(self, path):
      self.path = path

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def write(self, record):
      Path(self.path).write_bytes(record[:len(record) // 2])
      raise OSError("No space left on device")

  monkeypatch.setattr(tf.io, "TFRecordWriter", CrashingWriter)
  with pytest.raises(OSError):
    _build(bundle, examples, cache_dir)
  out_dir = _record_dir(cache_dir, bundle)
  assert list(out_dir.iterdir()) == []  # no record and no temporary file
  monkeypatch.setattr(tf.io, "TFRecordWriter", real_writer)
  records, stats = _build(bundle, examples, cache_dir)
  assert stats.encoded == 2 and stats.reused == 0
  assert all(r.path.exists() for r in records)


def test_write_manifests(built, tmp_path):
  recs = built["records"]
  empty = cache.Record(tmp_path / "none.tfrecord", 0)
  counts = cache.write_manifests(tmp_path / "m", {"a": recs[:3] + [empty], "b": [empty]})
  assert counts == {"a": 3, "b": 0}
  assert (tmp_path / "m" / "a.txt").read_text().splitlines() == [
      f"{r.example.image_path}\t{r.path}" for r in recs[:3]]
  assert cache.manifest_records(tmp_path / "m" / "a.txt") == [r.path for r in recs[:3]]
  assert (tmp_path / "m" / "b.txt").read_text() == ""


# ----------------------------------------------------------------------------- client datasets


def _spec(bundle, manifest_dir, **kw):
  args = dict(
      manifest_dir=str(manifest_dir), embedding_shape=sam_lib.embedding_shape(bundle.config),
      low_res=sam_lib.low_res_size(bundle.config), input_size=sam_lib.image_size(bundle.config),
      prompt="both", prompts_per_image=PROMPTS, box_jitter=4.0, num_points=2,
      num_negative_points=1, local_epochs=1, batch_size=2, seed=0)
  args.update(kw)
  return pipeline.PipelineSpec(**args)


@pytest.fixture(name="manifests", scope="module")
def _manifests(built, tmp_path_factory):
  folder = tmp_path_factory.mktemp("manifests")
  counts = cache.write_manifests(folder, {"all": built["records"], "two": built["records"][:2]})
  assert counts["all"] == 9
  return folder


def _batches(ds):
  return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds]


def _unbatch(batches):
  out = []
  for b in batches:
    for i in range(b["y"].shape[0]):
      out.append(dict(y=b["y"][i], **{k: v[i] for k, v in b["x"].items()}))
  return out


def _records_by_embedding(bundle, built):
  out = {}
  for r in built["records"]:
    rec = _read(bundle, r.path)
    out[rec["embedding"].tobytes()] = rec
  return out


def test_client_dataset_element_spec(bundle, manifests):
  spec = _spec(bundle, manifests)
  ds = pipeline.client_dataset("all@3", spec)
  c, s, _ = sam_lib.embedding_shape(bundle.config)
  low = spec.low_res
  es = ds.element_spec
  assert es["x"]["image_embeddings"] == tf.TensorSpec([None, c, s, s], tf.float32)
  assert es["x"]["boxes"] == tf.TensorSpec([None, PROMPTS, 4], tf.float32)
  assert es["x"]["points"] == tf.TensorSpec([None, PROMPTS, 3, 2], tf.float32)
  assert es["x"]["point_labels"] == tf.TensorSpec([None, PROMPTS, 3], tf.int32)
  assert es["y"] == tf.TensorSpec([None, PROMPTS, low, low], tf.float32)
  assert list(es["x"]) == ["image_embeddings", "boxes", "points", "point_labels"]


def _low_res_index(points, spec):
  scale = spec.input_size / spec.low_res
  idx = np.round((points - (scale - 1) / 2) / scale).astype(int)
  return idx


def _blocks(x, low):
  """Mean over the (factor x factor) blocks of an (S, S) array: the low-res frame."""
  f = x.shape[0] // low
  return x.reshape(low, f, low, f).mean(axis=(1, 3))


def test_client_dataset_examples(bundle, built, manifests):
  spec = _spec(bundle, manifests)
  low = spec.low_res
  batches = _batches(pipeline.client_dataset("all@3", spec))
  assert [b["y"].shape[0] for b in batches] == [2, 2, 2, 2, 1]
  examples = _unbatch(batches)
  by_emb = _records_by_embedding(bundle, built)
  seen = set()
  fractional = 0
  for ex in examples:
    rec = by_emb[ex["image_embeddings"].tobytes()]  # every element is one cached image
    seen.add(ex["image_embeddings"].tobytes())
    y = ex["y"]
    # Targets: -1 (ignored) or an object's coverage of a low-res pixel, in [0, 1].
    assert ((y == -1) | ((y >= 0) & (y <= 1))).all()
    fractional += int(((y > 0) & (y < 1)).sum())
    k = len(rec["object_ids"])
    assert 1 <= k < PROMPTS
    # Padded slots: all ignored, no box, no positive points. (Their negative points
    # are still sampled; harmless, since the whole slot is ignored by loss and metrics.)
    assert (y[k:] == -1).all()
    assert (ex["boxes"][k:] == 0).all()
    assert (ex["point_labels"][k:, :spec.num_points] == -1).all()
    inside = _blocks((rec["labels"] >= 0).astype(np.float64), low) > 0.5
    coverage = {int(i): _blocks((rec["labels"] == i).astype(np.float64), low)
                for i in rec["object_ids"]}
    chosen = []
    for j in range(k):
      np.testing.assert_array_equal(y[j] == -1, ~inside)  # ignore = padding only
      matches = [i for i, c in coverage.items() if np.allclose(y[j][inside], c[inside], atol=1e-6)]
      assert len(matches) == 1, matches
      obj = matches[0]
      chosen.append(obj)
      want_box = rec["boxes"][obj - 1]
      assert (np.abs(ex["boxes"][j] - want_box) <= spec.box_jitter + 1e-3).all()
      has_core = (coverage[obj] >= 0.5).any()
      np.testing.assert_array_equal(ex["point_labels"][j], [1, 1, 0] if has_core else [-1, -1, 0])
      idx = _low_res_index(ex["points"][j], spec)
      if has_core:
        assert (y[j][idx[:2, 1], idx[:2, 0]] >= 0.5).all()  # positives on the object
      neg = y[j][idx[2, 1], idx[2, 0]]
      assert 0 <= neg < 0.5  # the negative on valid background
    assert sorted(chosen) == sorted(rec["object_ids"].tolist())  # each object once
  assert len(seen) == 9
  assert fractional > 0  # soft targets on object boundaries


def test_client_dataset_deterministic_per_id_and_round(bundle, manifests):
  spec = _spec(bundle, manifests)
  a = _batches(pipeline.client_dataset("all@3", spec))
  b = _batches(pipeline.client_dataset(tf.constant("all@3"), spec))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    tf.nest.map_structure(np.testing.assert_array_equal, x, y)
  c = _batches(pipeline.client_dataset("all@4", spec))

  def prompts_of(batches):
    return {e["image_embeddings"].tobytes(): (e["boxes"], e["points"])
            for e in _unbatch(batches)}
  pa, pc = prompts_of(a), prompts_of(c)
  assert set(pa) == set(pc)
  for key in pa:
    assert not np.array_equal(pa[key][0], pc[key][0])  # fresh box jitter
  assert any(not np.array_equal(pa[key][1], pc[key][1]) for key in pa)  # fresh points


def _prompts_by_image(batches):
  return {e["image_embeddings"].tobytes(): (e["boxes"], e["points"]) for e in _unbatch(batches)}


def test_run_seed_changes_prompts(bundle, manifests):
  a = _prompts_by_image(_batches(pipeline.client_dataset("all@3", _spec(bundle, manifests))))
  b = _prompts_by_image(_batches(
      pipeline.client_dataset("all@3", _spec(bundle, manifests, seed=1))))
  assert set(a) == set(b)
  assert all(not np.array_equal(a[key][0], b[key][0]) for key in a)


def test_client_dataset_epochs_and_box_mode(bundle, manifests):
  spec = _spec(bundle, manifests, local_epochs=2, prompt="box", batch_size=3)
  examples = _unbatch(_batches(pipeline.client_dataset("two@0", spec)))
  assert len(examples) == 4
  for e in examples:
    assert (e["point_labels"] == -1).all() and (e["points"] == 0).all()
  # Each image appears once per epoch, with different prompts in the two epochs.
  keys = [e["image_embeddings"].tobytes() for e in examples]
  assert len(set(keys)) == 2
  first = {k: e["boxes"] for k, e in zip(keys[:2], examples[:2])}
  second = {k: e["boxes"] for k, e in zip(keys[2:], examples[2:])}
  assert set(first) == set(second)
  assert all(not np.array_equal(first[k], second[k]) for k in first)


def test_client_dataset_reports_batches_taken(bundle, manifests, tmp_path):
  """With `progress_dir`, each batch taken overwrites `<dir>/<id>` with the count."""
  spec = _spec(bundle, manifests, local_epochs=2, batch_size=4, progress_dir=str(tmp_path))
  expected = pipeline.expected_batches(9, spec)
  assert expected == 5  # 9 images x 2 epochs / 4 per batch, rounded up
  seen = []
  for i, batch in enumerate(pipeline.client_dataset("all@3", spec)):
    seen.append(int((tmp_path / "all@3").read_text()))
    assert seen[-1] == i + 1
  assert seen == list(range(1, expected + 1))
  plain = _batches(pipeline.client_dataset("all@3", _spec(bundle, manifests, local_epochs=2,
                                                          batch_size=4)))
  reported = _batches(pipeline.client_dataset("all@3", spec))
  tf.nest.map_structure(np.testing.assert_array_equal, plain, reported)  # Same data.


def test_client_dataset_in_legacy_graph(bundle, manifests):
  """TFF builds client datasets inside a tf.Graph from a string placeholder."""
  spec = _spec(bundle, manifests)
  eager = _batches(pipeline.client_dataset("all@3", spec))
  with tf.Graph().as_default() as graph:
    cid = tf.compat.v1.placeholder(tf.string, [])
    ds = pipeline.client_dataset(cid, spec)
    assert ds.element_spec["y"].shape.as_list() == [None, PROMPTS, spec.low_res, spec.low_res]
    it = tf.compat.v1.data.make_initializable_iterator(ds)
    nxt = it.get_next()
    with tf.compat.v1.Session(graph=graph) as sess:
      sess.run(it.initializer, feed_dict={cid: "all@3"})
      got = [sess.run(nxt) for _ in range(len(eager))]
      with pytest.raises(tf.errors.OutOfRangeError):
        sess.run(nxt)
  for g, e in zip(got, eager):
    tf.nest.map_structure(np.testing.assert_array_equal, g, e)


def test_build_client_data(bundle, manifests):
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  spec = _spec(bundle, manifests)
  cd = pipeline.build_client_data(["all", "two"], spec)
  assert isinstance(cd, tff.simulation.datasets.ClientData)
  assert cd.client_ids == ["all", "two"]
  assert pipeline.round_client_id("two", 7) == "two@7"
  for cid, dataset_fn in (("two", cd.create_tf_dataset_for_client),
                          ("two@7", cd.serializable_dataset_fn)):
    got = _batches(dataset_fn(cid))
    want = _batches(pipeline.client_dataset(cid, spec))
    assert len(got) == len(want) == 1
    tf.nest.map_structure(np.testing.assert_array_equal, got[0], want[0])


@pytest.mark.parametrize("chunk,cap", [(2, 0), (3, 2)])
def test_evaluation_dataset_prompts_every_object_once(bundle, built, manifests, chunk, cap):
  spec = _spec(bundle, manifests, prompts_per_image=chunk, box_jitter=0.0,
               box_jitter_fraction=0.0, evaluation=True, max_objects_per_image=cap,
               batch_size=1)
  examples = _unbatch(_batches(pipeline.evaluation_dataset("all@0", spec)))
  by_emb = _records_by_embedding(bundle, built)
  prompted = {}
  for ex in examples:
    rec = by_emb[ex["image_embeddings"].tobytes()]
    valid = ex["boxes"].any(axis=-1)
    n = int(valid.sum())
    assert 1 <= n <= chunk and valid[:n].all()  # valid slots first, then padding
    assert (ex["y"][n:] == -1).all()
    for box in ex["boxes"][valid]:
      # Exact (unjittered) boxes, objects in id order across the image's chunks.
      matches = [i for i, b in enumerate(rec["boxes"]) if np.allclose(b, box)]
      assert len(matches) == 1
      prompted.setdefault(ex["image_embeddings"].tobytes(), []).append(matches[0])
  assert len(prompted) == 9  # every image
  for key, seen in prompted.items():
    k = len(by_emb[key]["object_ids"])
    assert seen == list(range(min(k, cap) if cap else k))
  # Deterministic: the same examples again.
  again = _unbatch(_batches(pipeline.evaluation_dataset("all@0", spec)))
  for a, b in zip(examples, again):
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])
