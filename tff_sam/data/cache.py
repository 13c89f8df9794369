"""The embedding cache: each image is encoded once by the frozen image encoder.

One TFRecord file per image holds its image embedding (float16), its instance labels
in SAM's input frame (a 16-bit PNG, objects renumbered 1..K, padding 65535), and its
object ids and tight boxes (input frame).
The file name is a hash of the encoder fingerprint, the preprocessing settings and
the raw bytes of the image and mask files, so a changed image, mask, model or setting
gets a new record and nothing stale is ever reused. Records are written atomically.

Per-client manifests (text files, one line per image: the source image path, a tab,
its record path; `write_manifests`) tell TFF's client datasets
what to read; datasets are built from the manifest *inside* the TFF computation, so
no embedding is ever serialized into a graph.

Online mode (`--noembedding_cache`, `build_records(online=True)`): the record holds the
image as the processor resized it (8-bit PNG, before normalization and padding)
instead of an embedding; `parse_record(normalization=...)` redoes the processor's
rescale, normalization and padding in TF, and the TFF model runs the frozen encoder.

Adapted mode (`--adapter=lora` with the cache, `build_records(feature_start=k)`): the
record holds the frozen encoder's activations at `k` (`encoders.features`, float16,
channels last), where the first adapted block starts; the TFF model runs the rest.
"""

import collections
import dataclasses
import hashlib
from pathlib import Path
from typing import Iterable, Optional, Sequence

import cv2
import numpy as np
import tensorflow as tf

from tff_sam import fileio
from tff_sam import terminal
from tff_sam.data import discovery
from tff_sam.data import preprocess
from tff_sam.data import reading
from tff_sam.models import encoders
from tff_sam.models import sam as sam_lib

# 3: masks are read with the lossy/colour refusals of `reading` (older records may
# hold masks that are now errors).
RECORD_VERSION = 3
PNG_PAD = 65535


@dataclasses.dataclass
class CacheStats:
  """Counts from building records (reported in `summary.json`).

  Attributes:
    images: Examples given to `build_records` (including skipped ones).
    encoded: Records computed now.
    reused: Records found in the cache.
    objects: Objects in the records.
    images_without_objects: Records without any object (an all-zero mask, or every
      object vanished at SAM's resolution); kept out of training.
    objects_too_small: Objects that vanished at SAM's resolution.
    skipped: Examples skipped with `skip_bad_examples=True`: reason -> count (see
      `discovery.SKIP_REASONS`); only reasons that occurred appear.
  """

  images: int = 0
  encoded: int = 0
  reused: int = 0
  objects: int = 0
  images_without_objects: int = 0
  objects_too_small: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)

  def add(self, other: "CacheStats") -> None:
    for f in dataclasses.fields(self):
      if f.name == "skipped":
        for reason, n in other.skipped.items():
          self.skipped[reason] = self.skipped.get(reason, 0) + n
      else:
        setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())


@dataclasses.dataclass(frozen=True)
class Record:
  """A cached example: its record path, its number of trainable objects, its example.

  Pair records with examples through `example`, not by position: `build_records`
  with `skip_bad_examples=True` returns no record for a skipped example.
  """

  path: Path
  num_objects: int
  example: Optional[discovery.Example] = None


def record_key(*, fingerprint: str, example: discovery.Example, binary_components: bool,
               input_size: int, online: bool = False,
               feature_start: Optional[int] = None) -> str:
  """The cache key of one example (hash of model, settings and file contents)."""
  h = hashlib.sha256()
  kind = ["image"] if online else []  # embedding records keep their old keys
  if feature_start is not None:
    kind = ["features", str(feature_start)]
  for part in (f"v{RECORD_VERSION}", fingerprint, str(binary_components), str(input_size),
               *kind,
               fileio.sha256_file(example.image_path), fileio.sha256_file(example.mask_path)):
    h.update(part.encode())
    h.update(b"\0")
  return h.hexdigest()[:32]


def _bytes_feature(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int_feature(values: Iterable[int]) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def _float_feature(values: Iterable[float]) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def encode_labels(labels: np.ndarray) -> bytes:
  """(S, S) int labels (-1 padding, values < 65535) as 16-bit PNG bytes."""
  if labels.max(initial=0) >= PNG_PAD:
    raise ValueError("labels must be < 65535 (renumber objects first)")
  ok, png = cv2.imencode(".png", np.where(labels < 0, PNG_PAD, labels).astype(np.uint16))
  assert ok
  return png.tobytes()


def renumber(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Maps object ids `ids` to 1..K (other non-negative values to 0; -1 stays)."""
  out = np.where(labels < 0, -1, 0).astype(np.int32)
  for new, old in enumerate(ids, start=1):
    out[labels == old] = new
  return out


def serialize_record(*, embedding: Optional[np.ndarray] = None,
                     image: Optional[np.ndarray] = None,
                     features: Optional[np.ndarray] = None, input_labels: np.ndarray,
                     object_ids: np.ndarray, boxes: np.ndarray,
                     original_size: Sequence[int], reshaped_size: Sequence[int],
                     stem: str) -> bytes:
  """Serializes one example as a `tf.train.Example` (labels as 16-bit PNG).

  Exactly one of `embedding` (float16 tensor), `image` ((h, w, 3) uint8 resized
  image, as an 8-bit PNG; online mode) and `features` (float16 tensor; adapted mode)
  is stored.
  """
  if sum(x is not None for x in (embedding, image, features)) != 1:
    raise ValueError("pass exactly one of embedding, image and features")
  if embedding is not None or features is not None:
    key, value = ("embedding", embedding) if embedding is not None else ("features", features)
    payload = {key: _bytes_feature(
        tf.io.serialize_tensor(tf.constant(value, tf.float16)).numpy())}
  else:
    payload = {"image": _bytes_feature(tf.io.encode_png(np.asarray(image, np.uint8)).numpy())}
  feature = {
      **payload,
      "labels": _bytes_feature(encode_labels(input_labels)),
      "object_ids": _int_feature(int(i) for i in object_ids),
      "boxes": _float_feature(float(v) for v in np.asarray(boxes).reshape(-1)),
      "original_size": _int_feature(original_size),
      "reshaped_size": _int_feature(reshaped_size),
      "stem": _bytes_feature(stem.encode()),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_record(serialized: tf.Tensor, *, embedding_shape: Sequence[int],
                 input_size: int,
                 normalization: Optional[preprocess.PixelNormalization] = None,
                 feature_shape: Optional[Sequence[int]] = None) -> dict[str, tf.Tensor]:
  """Parses a record written by `serialize_record` (graph-safe).

  With `normalization` (online mode) the record holds an image and the result has
  `pixel_values` (3, S, S) instead of `embedding`; with `feature_shape` (adapted mode)
  it holds the encoder's activations and the result has `features` of that shape.
  """
  payload = ("image" if normalization is not None else
             "features" if feature_shape is not None else "embedding")
  spec = {
      payload: tf.io.FixedLenFeature([], tf.string),
      "labels": tf.io.FixedLenFeature([], tf.string),
      "object_ids": tf.io.VarLenFeature(tf.int64),
      "boxes": tf.io.VarLenFeature(tf.float32),
      "original_size": tf.io.FixedLenFeature([2], tf.int64),
      "reshaped_size": tf.io.FixedLenFeature([2], tf.int64),
      "stem": tf.io.FixedLenFeature([], tf.string),
  }
  f = tf.io.parse_single_example(serialized, spec)
  if normalization is not None:
    image = tf.io.decode_png(f["image"], channels=3, dtype=tf.uint8)
    first = {"pixel_values": preprocess.pixel_values_tf(image, normalization, input_size)}
  elif feature_shape is not None:
    features = tf.ensure_shape(tf.io.parse_tensor(f["features"], tf.float16),
                               list(feature_shape))
    first = {"features": tf.cast(features, tf.float32)}
  else:
    embedding = tf.ensure_shape(
        tf.io.parse_tensor(f["embedding"], tf.float16), list(embedding_shape))
    first = {"embedding": tf.cast(embedding, tf.float32)}
  png = tf.cast(tf.io.decode_png(f["labels"], channels=1, dtype=tf.uint16)[..., 0], tf.int32)
  labels = tf.ensure_shape(tf.where(tf.equal(png, PNG_PAD), -1, png), [input_size, input_size])
  return {
      **first,
      "labels": labels,
      "object_ids": tf.cast(tf.sparse.to_dense(f["object_ids"]), tf.int32),
      "boxes": tf.reshape(tf.sparse.to_dense(f["boxes"]), [-1, 4]),
      "original_size": f["original_size"],
      "reshaped_size": f["reshaped_size"],
      "stem": f["stem"],
  }


def _count_objects(path: Path) -> int:
  """Objects in a record, without decoding its embedding or labels."""
  raw = next(iter(tf.data.TFRecordDataset(str(path)))).numpy()
  return len(tf.train.Example.FromString(raw).features.feature["object_ids"].int64_list.value)


def read_record(path: Path, *, embedding_shape: Sequence[int], input_size: int,
                **payload) -> dict[str, np.ndarray]:
  """Reads one record file eagerly into numpy arrays (`payload`: `parse_record`'s
  `normalization` or `feature_shape`)."""
  serialized = next(iter(tf.data.TFRecordDataset(str(path))))
  return {k: v.numpy() for k, v in parse_record(
      serialized, embedding_shape=embedding_shape, input_size=input_size, **payload).items()}


def build_records(examples: Sequence[discovery.Example], *, bundle: sam_lib.SamBundle,
                  cache_root: Path, binary_components: bool, batch_size: int,
                  desc: str = "encoding", show_progress: bool = True,
                  skip_bad_examples: bool = False, online: bool = False,
                  feature_start: Optional[int] = None) -> tuple[list[Record], CacheStats]:
  """Makes sure every example has a cached record; encodes the missing ones.

  Args:
    examples: The examples.
    bundle: The model whose image encoder computes embeddings.
    cache_root: Cache root; records go to `cache_root/embeddings/<fingerprint>/`.
    binary_components: How binary masks are split into objects (see `data`).
    batch_size: Images per encoder call.
    desc: Label of the progress bar.
    show_progress: Show a progress bar on stderr while encoding.
    skip_bad_examples: An example whose files cannot be read or do not match (a
      `discovery.ExampleError`: unreadable, unsupported shape, size mismatch, bad mask
      values) is skipped with a one-line warning and counted in `stats.skipped`
      instead of raising.
    online: Store the processor-resized image instead of its embedding (no encoder
      runs; see the module docstring).
    feature_start: Store the frozen encoder's activations at this stage/block
      (`encoders.features`) instead of the embedding (adapted mode).

  Returns:
    The records, in the order of `examples`, and the counts. Without
    `skip_bad_examples` there is one record per example; with it, skipped examples
    have no record, so pair records with examples through `Record.example`.

  Raises:
    errors.DataError: An unreadable file, an image/mask size mismatch or bad mask
      values (without `skip_bad_examples`).
  """
  if online and feature_start is not None:
    raise ValueError("online records hold images, not features")
  input_size = sam_lib.image_size(bundle.config)
  out_dir = Path(cache_root) / ("images" if online else "embeddings") / bundle.fingerprint
  if feature_start is not None:
    out_dir = Path(cache_root) / "features" / f"{bundle.fingerprint}-from{feature_start}"
  stats = CacheStats(images=len(examples))
  records: list[Optional[Record]] = [None] * len(examples)
  todo = []
  for i, ex in enumerate(examples):
    key = record_key(fingerprint=bundle.fingerprint, example=ex, online=online,
                     feature_start=feature_start,
                     binary_components=binary_components, input_size=input_size)
    path = out_dir / f"{key}.tfrecord"
    if path.exists():
      records[i] = Record(path, _count_objects(path), ex)
      stats.reused += 1
    else:
      todo.append((i, ex, path))
  skipped: collections.Counter = collections.Counter()
  encode = None
  if todo and feature_start is not None:
    encode = encoders.feature_fn(bundle, start=feature_start)
  elif todo and not online:
    encode = bundle.encoder_fn()
  progress = None
  if todo and show_progress:
    progress = terminal.progress_bar(total=len(todo), desc=desc, unit="img")
  for start in range(0, len(todo), batch_size):
    batch = todo[start:start + batch_size]
    chunk, prepared = _read_chunk(batch, bundle=bundle, input_size=input_size, online=online,
                                  binary_components=binary_components,
                                  skipped=skipped if skip_bad_examples else None)
    if progress is not None:
      progress.update(len(batch) - len(chunk))
    if not chunk:
      continue
    if online:
      embeddings = [None] * len(prepared)
    else:
      embeddings = encode(tf.constant(np.stack([p.pixel_values for _, p in prepared]))).numpy()
    for (i, ex, path), (labels, prep), emb in zip(chunk, prepared, embeddings):
      records[i] = _write_example_record(path, ex, labels=labels, prep=prep, output=emb,
                                         online=online, features=feature_start is not None,
                                         input_size=input_size, stats=stats)
    if progress is not None:
      progress.update(len(chunk))
  if progress is not None:
    progress.close()
  kept = [r for r in records if r is not None]
  for r in kept:
    stats.objects += r.num_objects
    stats.images_without_objects += int(r.num_objects == 0)
  stats.skipped = dict(sorted(skipped.items()))
  return kept, stats


def _read_chunk(batch: list, *, bundle: sam_lib.SamBundle, input_size: int, online: bool,
                binary_components: bool, skipped: Optional[collections.Counter]
                ) -> tuple[list, list]:
  """Reads and preprocesses a batch of `(index, example, path)`; returns the items read
  and their `(labels, preprocessed)`.

  An unreadable example raises `discovery.ExampleError`, or is skipped and counted in
  `skipped` when that is given.
  """
  chunk, prepared = [], []
  for item in batch:
    try:
      image, labels = reading.load_example(item[1], binary_components=binary_components)
      preprocess.require_resizable(item[1].image_path, image.shape[:2], input_size)
    except discovery.ExampleError as e:
      if skipped is None:
        raise
      discovery.skip_example(e, skipped)
      continue
    chunk.append(item)
    # Online records keep the resized 8-bit image, not the float pixel values.
    prepared.append((labels, preprocess.preprocess(bundle.processor, image, labels,
                                                   input_size=input_size, resized_only=online)))
  return chunk, prepared


def _write_example_record(path: Path, example: discovery.Example, *, labels: np.ndarray,
                          prep: preprocess.Preprocessed, output: Optional[np.ndarray],
                          online: bool, features: bool, input_size: int,
                          stats: CacheStats) -> Record:
  """Writes one example's record: its objects still visible at the encoder's input size,
  their boxes, and the encoder's `output` (embedding, or `features`) or, `online`, the
  resized image. Counts it (and the objects too small to keep) in `stats`."""
  ids = reading.object_ids(labels)
  visible = np.isin(ids, np.unique(prep.input_labels))
  stats.objects_too_small += int((~visible).sum())
  ids = ids[visible]
  boxes = preprocess.to_input_frame(
      preprocess.boxes_from_labels(labels, ids).reshape(-1, 2, 2),
      prep.original_size, input_size).reshape(-1, 4)
  _write_record(path, serialize_record(
      embedding=None if features else output, features=output if features else None,
      image=prep.pixel_values if online else None,
      input_labels=renumber(prep.input_labels, ids),
      object_ids=np.arange(1, len(ids) + 1), boxes=boxes,
      original_size=prep.original_size, reshaped_size=prep.reshaped_size, stem=example.stem))
  stats.encoded += 1
  return Record(path, len(ids), example)


def _write_record(path: Path, example_bytes: bytes) -> None:
  """Atomically writes one serialized example as a TFRecord file."""
  with fileio.atomic_path(path) as tmp:
    with tf.io.TFRecordWriter(str(tmp)) as writer:
      writer.write(example_bytes)


MANIFEST_SEPARATOR = "\t"


def write_manifests(manifest_dir: Path, clients: dict[str, Sequence[Record]]) -> dict[str, int]:
  """Writes one manifest per client listing its records that have objects.

  Each line is `<source image path><TAB><record path>`: the user's image first (what
  a person reads), the cached record last (what the pipeline reads).

  Returns:
    Client id -> number of training images listed.
  """
  counts = {}
  for client, recs in clients.items():
    usable = [(f"{r.example.image_path}{MANIFEST_SEPARATOR}" if r.example else "") + str(r.path)
              for r in recs if r.num_objects > 0]
    fileio.write_text(Path(manifest_dir) / f"{client}.txt", "".join(p + "\n" for p in usable))
    counts[client] = len(usable)
  return counts


def manifest_records(manifest: Path) -> list[Path]:
  """The record paths a manifest lists (its lines' last field)."""
  return [Path(line.rsplit(MANIFEST_SEPARATOR, 1)[-1])
          for line in Path(manifest).read_text().splitlines() if line]
