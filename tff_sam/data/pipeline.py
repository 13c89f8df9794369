"""Client datasets: cached records -> prompted, batched training examples (tf.data).

A client's dataset is built from its manifest (a text file of record paths, see
`cache`) by a pure-TF function of the client id string, so TFF builds it inside
the computation by id (`ClientData.from_clients_and_tf_fn` +
`tff.simulation.compose_dataset_computation_with_learning_process`): nothing but the
id crosses into the TFF runtime and nothing is baked into a serialized graph.

Client ids passed to the process carry the round, `"<client>@<round>"`, so the
shuffle order and the prompts are a deterministic function of (run seed, client,
round, epoch, example) and differ from round to round.
"""

import collections
import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import tensorflow as tf
import tensorflow_federated as tff

from tff_sam import config as config_lib
from tff_sam.data import cache
from tff_sam.data import preprocess
from tff_sam.data import prompts as prompts_lib
from tff_sam.models import point_prompts
from tff_sam.models import sam as sam_lib

ROUND_SEPARATOR = "@"
# Box jitter is given in pixels of SAM's 1024 input frame; smaller models scale it.
REFERENCE_INPUT_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
  """Static settings of the client pipeline.

  Attributes:
    manifest_dir: Folder with `<client>.txt` manifests.
    embedding_shape: (C, s, s) of one image embedding.
    low_res: Side of the low-resolution mask frame.
    input_size: Side of SAM's input frame.
    prompt: `box`, `points` or `both`.
    prompts_per_image: Objects (prompts) sampled per image per epoch.
    box_jitter: Max box jitter in input-frame pixels.
    box_jitter_fraction: Jitter std as a fraction of the box side (0 = uniform).
    num_points: Positive points per prompt.
    num_negative_points: Negative points per prompt.
    sub_iterations: With `prompt=iterative`: decoder passes per step; examples then
      carry one sampled positive point and `sub_iterations - 1` empty point slots
      (label -10) for the corrections, `use_box` (P,) (1: start from the box, 0: from
      the point; always 1 for evaluation), `target` (P, L, L) (the targets, from which
      the model samples its corrections) and `seed` (2,) (their randomness).
    local_epochs: Passes over the client's data per round.
    batch_size: Images per batch.
    seed: Run seed.
    evaluation: Evaluation datasets (`evaluation_dataset`): every object once, in
      chunks of `prompts_per_image`, in file order; else training datasets.
    max_objects_per_image: With `evaluation`, use at most this many objects of each
      image (the lowest ids; 0 = all).
    normalization: Online mode: records hold resized images, examples carry
      `pixel_values` (normalized and padded like `SamImageProcessor`) instead of
      `image_embeddings`. None: records hold embeddings.
    feature_shape: Adapted mode: records hold the frozen encoder's activations of this
      (h, w, c) shape and examples carry them as `features` instead of
      `image_embeddings`.
    progress_dir: Training datasets report their progress here: as each batch is
      taken, the file `<progress_dir>/<client id>` is overwritten with the number of
      batches taken so far (read by `federated.progress`). None: no reports.
  """

  manifest_dir: str
  embedding_shape: tuple[int, int, int]
  low_res: int
  input_size: int
  prompt: str = config_lib.BOX_PROMPT
  prompts_per_image: int = 4
  box_jitter: float = 20.0
  box_jitter_fraction: float = 0.1
  num_points: int = 1
  num_negative_points: int = 0
  sub_iterations: int = 3
  local_epochs: int = 1
  batch_size: int = 2
  seed: int = 0
  evaluation: bool = False
  max_objects_per_image: int = 0
  normalization: Optional[preprocess.PixelNormalization] = None
  feature_shape: Optional[tuple[int, int, int]] = None
  progress_dir: Optional[str] = None


def build_pipeline_spec(*, sam_config, manifest_dir,
                        normalization: Optional[preprocess.PixelNormalization] = None,
                        box_jitter: float = 20.0, **settings) -> PipelineSpec:
  """The client pipeline for a SAM architecture: shapes from its config.

  Args:
    sam_config: The model's `SamConfig`.
    manifest_dir: Folder with the clients' manifests.
    normalization: Online mode: records hold resized images and the processor's
      normalization (`preprocess.pixel_normalization`) is redone in TF. None:
      records hold embeddings.
    box_jitter: Max box jitter in pixels of SAM's 1024 input frame (scaled to the
      model's input size).
    **settings: Any other `PipelineSpec` field (prompt, prompts_per_image, batch_size,
      seed, ...).

  Returns:
    The spec.
  """
  side = sam_lib.image_size(sam_config)
  return PipelineSpec(
      manifest_dir=str(Path(manifest_dir).resolve()),
      embedding_shape=sam_lib.embedding_shape(sam_config),
      low_res=sam_lib.low_res_size(sam_config), input_size=side,
      box_jitter=box_jitter * side / REFERENCE_INPUT_SIZE, normalization=normalization,
      **settings)


def round_client_id(client: str, round_num: int) -> str:
  """The id passed to the process for `client` in round `round_num`."""
  return f"{client}{ROUND_SEPARATOR}{round_num}"


def make_example(record: dict[str, tf.Tensor], seed: tf.Tensor, spec: PipelineSpec,
                 order: Optional[tf.Tensor] = None):
  """Samples prompts and targets for one cached image.

  Args:
    record: A parsed record (see `cache.parse_record`).
    seed: Stateless seed, shape [2].
    spec: Pipeline settings.
    order: Indices of the objects to prompt (at most `spec.prompts_per_image`);
      default a random sample of them.

  Returns:
    `OrderedDict(x=..., y=...)`: x holds `image_embeddings` (C, s, s) (online mode:
    `pixel_values` (3, S, S) instead), `boxes` (P, 4),
    `points` (P, N, 2), `point_labels` (P, N); y is (P, L, L) with 1 object,
    0 background, -1 ignore; in between, an object's coverage of a low-resolution
    pixel (soft target). Slots beyond the image's object count are all -1.
  """
  p = spec.prompts_per_image
  seeds = tf.random.experimental.stateless_split(seed, 3)
  ids, boxes, labels = record["object_ids"], record["boxes"], record["labels"]
  k = tf.shape(ids)[0]
  if order is None:
    order = tf.argsort(tf.random.stateless_uniform([k], seeds[0]))[:p]
  n = tf.shape(order)[0]
  slot_valid = tf.range(p) < n
  chosen_ids = tf.pad(tf.gather(ids, order), [[0, p - n]], constant_values=-2)
  chosen_boxes = tf.pad(tf.gather(boxes, order), [[0, p - n], [0, 0]])
  chosen_boxes = prompts_lib.jitter_boxes(
      chosen_boxes, max_jitter=spec.box_jitter, input_size=spec.input_size, seed=seeds[1],
      side_fraction=spec.box_jitter_fraction)
  chosen_boxes = tf.where(slot_valid[:, None], chosen_boxes, 0.0)
  # Soft targets: each object's coverage of every low-resolution pixel.
  factor = spec.input_size // spec.low_res
  objects_hi = tf.cast(tf.equal(labels[None], chosen_ids[:, None, None]), tf.float32)
  coverage = tf.nn.avg_pool2d(objects_hi[..., None], factor, factor, "VALID")[..., 0]
  inside = tf.nn.avg_pool2d(tf.cast(labels >= 0, tf.float32)[None, ..., None], factor,
                            factor, "VALID")[0, ..., 0] > 0.5
  ignore = tf.logical_or(tf.logical_not(inside)[None],
                         tf.logical_not(slot_valid)[:, None, None])
  target = tf.where(ignore, -1.0, coverage)
  objects = tf.cast(coverage >= 0.5, tf.float32)
  n_pts = spec.num_points + spec.num_negative_points
  box_or_point = spec.prompt in config_lib.BOX_OR_POINT_PROMPTS
  iterative = spec.prompt == config_lib.ITERATIVE_PROMPT
  if box_or_point:
    more = tf.random.experimental.stateless_split(seeds[2], 3)
    first, first_labels = prompts_lib.sample_points(
        objects, inside, num_positive=1, num_negative=0, input_size=spec.input_size,
        seed=more[0])
    n_pts = spec.sub_iterations if iterative else 1
    points = tf.concat([first, tf.zeros([p, n_pts - 1, 2], tf.float32)], axis=1)
    point_labels = tf.concat(
        [first_labels, tf.fill([p, n_pts - 1], point_prompts.NO_TOKEN)], axis=1)
  elif config_lib.uses_points(spec.prompt):
    points, point_labels = prompts_lib.sample_points(
        objects, inside, num_positive=spec.num_points,
        num_negative=spec.num_negative_points, input_size=spec.input_size, seed=seeds[2])
  else:
    points = tf.zeros([p, n_pts, 2], tf.float32)
    point_labels = tf.fill([p, n_pts], point_prompts.NOT_A_POINT)
  image = (("pixel_values", record["pixel_values"]) if "pixel_values" in record else
           ("features", record["features"]) if "features" in record else
           ("image_embeddings", record["embedding"]))
  x = collections.OrderedDict(
      [image],
      boxes=tf.ensure_shape(chosen_boxes, [p, 4]),
      points=tf.ensure_shape(points, [p, n_pts, 2]),
      point_labels=tf.ensure_shape(point_labels, [p, n_pts]))
  if box_or_point:
    use_box = (tf.ones([p], tf.int32) if spec.evaluation else tf.cast(
        tf.random.stateless_uniform([p], more[1]) < 0.5, tf.int32))
    x["use_box"] = use_box
  if iterative:
    x["target"] = tf.ensure_shape(target, [p, spec.low_res, spec.low_res])
    x["seed"] = tf.random.stateless_uniform([2], more[2], 0, 2**31 - 1, dtype=tf.int32)
  return collections.OrderedDict(x=x, y=tf.ensure_shape(target, [p, spec.low_res, spec.low_res]))


def _record_path(line: tf.Tensor) -> tf.Tensor:
  """A manifest line's record path: its last tab-separated field (`cache.write_manifests`)."""
  return tf.strings.split(line, cache.MANIFEST_SEPARATOR)[-1]


def _seed_for(client_id: tf.Tensor, spec: PipelineSpec) -> tf.Tensor:
  """A 63-bit seed from (run seed, client id incl. round): differs for each of them."""
  return tf.strings.to_hash_bucket_fast(
      tf.strings.join([str(spec.seed), "/", client_id]), 2**62)


def client_dataset(client_id: tf.Tensor, spec: PipelineSpec) -> tf.data.Dataset:
  """The training dataset of one client, from its id (`client` or `client@round`).

  Pure TF: usable inside a TFF computation. Manifest lines (record paths) are
  shuffled per epoch, so only one embedding per pipeline stage is in memory.
  """
  client_id = tf.convert_to_tensor(client_id, tf.string)
  name = tf.strings.split(client_id, ROUND_SEPARATOR)[0]
  seed = _seed_for(client_id, spec)
  manifest = tf.strings.join([spec.manifest_dir, "/", name, ".txt"])
  files = tf.data.TextLineDataset(manifest).map(_record_path)
  files = files.shuffle(4096, seed=seed, reshuffle_each_iteration=True)
  files = files.repeat(spec.local_epochs)
  records = tf.data.TFRecordDataset(files)

  def parse(serialized):
    return cache.parse_record(
        serialized, embedding_shape=spec.embedding_shape, input_size=spec.input_size,
        normalization=spec.normalization, feature_shape=spec.feature_shape)

  def to_example(index, record):
    return make_example(record, tf.stack([seed, index]), spec)

  examples = records.map(parse).enumerate().map(
      to_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  batches = examples.batch(spec.batch_size).prefetch(2)
  if spec.progress_dir is None:
    return batches
  report = tf.strings.join([spec.progress_dir, "/", client_id])

  def reported(index, batch):
    # After prefetch: written when the training loop takes the batch.
    with tf.control_dependencies([tf.io.write_file(report, tf.strings.as_string(index + 1))]):
      return tf.nest.map_structure(tf.identity, batch)

  # No prefetch injected after the report (tf.data's default optimization would run it
  # ahead of the training loop): the count is of batches the loop has taken.
  options = tf.data.Options()
  options.experimental_optimization.inject_prefetch = False
  return batches.enumerate().map(reported).with_options(options)


def expected_batches(num_images: int, spec: PipelineSpec) -> int:
  """Batches a training client with `num_images` images takes per round."""
  return -(-num_images * spec.local_epochs // spec.batch_size)


def evaluation_dataset(client_id: tf.Tensor, spec: PipelineSpec) -> tf.data.Dataset:
  """The evaluation dataset of one client: every object of every image, once.

  Each image yields ceil(objects / `prompts_per_image`) examples, object chunks in id
  order (padding slots are ignored by the loss and metrics), so memory does not grow
  with the number of objects per image. Prompts are deterministic given the id.
  """
  client_id = tf.convert_to_tensor(client_id, tf.string)
  name = tf.strings.split(client_id, ROUND_SEPARATOR)[0]
  seed = _seed_for(client_id, spec)
  p = spec.prompts_per_image
  files = tf.data.TextLineDataset(
      tf.strings.join([spec.manifest_dir, "/", name, ".txt"])).map(_record_path)

  def parse(serialized):
    return cache.parse_record(
        serialized, embedding_shape=spec.embedding_shape, input_size=spec.input_size,
        normalization=spec.normalization, feature_shape=spec.feature_shape)

  def chunks(index, record):
    k = tf.shape(record["object_ids"])[0]
    if spec.max_objects_per_image:
      k = tf.minimum(k, spec.max_objects_per_image)

    def example(c):
      first = tf.cast(c, tf.int32) * p
      order = tf.range(first, tf.minimum(first + p, k))
      return make_example(record, tf.stack([seed, index * 2**20 + c]), spec, order=order)

    return tf.data.Dataset.range(tf.cast((k + p - 1) // p, tf.int64)).map(example)

  examples = tf.data.TFRecordDataset(files).map(parse).enumerate().flat_map(chunks)
  return examples.batch(spec.batch_size).prefetch(2)


def build_client_data(client_ids: Sequence[str], spec: PipelineSpec):
  """A TFF `ClientData` whose datasets are built by id from the manifests."""
  def dataset_fn(client_id):
    if spec.evaluation:
      return evaluation_dataset(client_id, spec)
    return client_dataset(client_id, spec)

  return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(list(client_ids), dataset_fn)
