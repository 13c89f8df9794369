"""Held-out evaluation at the original image resolution.

For every object of every test image, the model is prompted by one evaluation prompt
(`config.EVAL_PROMPTS`): the object's tight box (no jitter); its most interior point;
or the box followed by k corrective clicks, each at the centre of the largest region
where the previous mask was wrong (positive on missed object, negative on wrong
background), with the previous low-resolution logits fed back as SAM's mask prompt,
as micro-sam evaluates. The low-resolution mask logits go through SAM's own
post-processing (`SamImageProcessor.post_process_masks`: upsample to the padded
input, crop the padding, resize to the original size, threshold at 0) and are
compared with the object's full-resolution ground truth. Dice and IoU are averaged
over objects (every object counts once, whatever its image); mSA, SA50 and SA75
(`instance_metrics`) over images, from the image's prompted masks stitched into one
label image.

Image embeddings come from the embedding cache, or, for a model whose image encoder
was adapted (`--adapter=lora`), from that encoder (`adapted_embeddings`,
`Evaluator.set_image_embeddings`); ground truth is read again from the original mask
files, so objects too small for the low-resolution frame still count.
"""

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam import fileio
from tff_sam import terminal
from tff_sam.data import cache
from tff_sam.data import datasets
from tff_sam.data import discovery
from tff_sam.data import preprocess
from tff_sam.data import reading
from tff_sam.evaluation import automatic
from tff_sam.evaluation import inference
from tff_sam.evaluation import instance_metrics
from tff_sam.models import build
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import losses
from tff_sam.models import sam as sam_lib


@dataclasses.dataclass(frozen=True)
class EvalResult:
  """Scores on a test set.

  Attributes:
    dice: Mean Dice over all objects.
    iou: Mean IoU over all objects.
    num_objects: Objects evaluated.
    num_images: Images evaluated.
    msa: Mean over images of micro-sam's mean segmentation accuracy (IoU thresholds
      0.5:0.05:0.95) of the prompted masks stitched into one label image per image
      (`instance_metrics`).
    sa50: The same at IoU 0.5.
    sa75: The same at IoU 0.75.
    eval_prompt: The evaluation prompt (`config.EVAL_PROMPTS`).
    by_client: Evaluation client -> `{"dice", "iou", "msa", "sa50", "sa75",
      "num_objects", "num_images"}` over its images, when the evaluator was given
      `clients` (and `objects_found` for `automatic`).
    objects_found: With `automatic` (no prompts, so no Dice or IoU): the objects of
      the label images; `num_objects` counts the true ones (every object of the
      mask, whatever `max_objects_per_image`).
    hint: With `automatic` and no object found: which filter removed every mask and
      the thresholds to try (`automatic.Tally.hint`).
  """

  dice: float
  iou: float
  num_objects: int
  num_images: int
  msa: float = float("nan")
  sa50: float = float("nan")
  sa75: float = float("nan")
  eval_prompt: str = config_lib.BOX_EVAL
  by_client: dict = dataclasses.field(default_factory=dict)
  objects_found: Optional[int] = None
  hint: str = ""

  def scores_line(self) -> str:
    """The scores for a log line: Dice, IoU, mSA, SA50 (automatic: mSA, SA50, counts)."""
    if self.objects_found is not None:
      return (f"mSA {self.msa:.4f}  SA50 {self.sa50:.4f}  objects {self.objects_found} "
              f"found / {self.num_objects} true" + (f"; hint: {self.hint}" if self.hint else ""))
    return (f"dice {self.dice:.4f}  iou {self.iou:.4f}  mSA {self.msa:.4f}  "
            f"SA50 {self.sa50:.4f}")

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    if self.objects_found is None:  # Prompted: as before `automatic` existed.
      del out["objects_found"]
    if not self.hint:
      del out["hint"]
    return out


@dataclasses.dataclass
class _TestImage:
  example: discovery.Example
  embedding: np.ndarray
  original_size: tuple[int, int]
  reshaped_size: tuple[int, int]
  labels: np.ndarray
  ids: np.ndarray
  boxes: np.ndarray
  points: np.ndarray


def select_objects(ids: np.ndarray, *, max_objects: int, stem: str) -> np.ndarray:
  """A deterministic subset of at most `max_objects` ids (all when 0)."""
  if not max_objects or len(ids) <= max_objects:
    return ids
  rng = np.random.default_rng(list(stem.encode()))
  return np.sort(rng.choice(ids, size=max_objects, replace=False))


class Evaluator:
  """Evaluates `PromptMaskDecoder` weights on a fixed test set.

  Test images (embeddings, labels, prompts) are loaded once; each call runs the
  decoder and post-processing only.
  """

  def __init__(self, *, examples: Sequence[discovery.Example],
               records: Sequence[cache.Record], bundle: sam_lib.SamBundle,
               binary_components: bool = False, max_objects_per_image: int = 0,
               chunk: int = 16, clients: Optional[Sequence[str]] = None,
               corrections: int = 3,
               automatic_settings: Optional[config_lib.AutomaticSettings] = None):
    """Loads the test set.

    Args:
      examples: Test examples (image and mask files).
      records: Their cached records (same order), from `cache.build_records`.
      clients: Optional evaluation client of each example (same order), for scores
        per client in `EvalResult.by_client`.
      bundle: The model bundle (config and processor).
      binary_components: How binary masks are split into objects.
      max_objects_per_image: Evaluate at most this many objects per image, chosen
        deterministically (0 = all).
      chunk: Objects per decoder call.
      corrections: Corrective points of the `box_corrections` evaluation prompt.
      automatic_settings: The `automatic` evaluation's settings (default SAM's), on
        each image's cached embedding (no crops).
    """
    self._bundle = bundle
    self._config = bundle.config
    self._processor = bundle.processor
    self._chunk = chunk
    input_size = sam_lib.image_size(self._config)
    shape = sam_lib.embedding_shape(self._config)
    self.images: list[_TestImage] = []
    for ex, rec in zip(examples, records, strict=True):
      r = cache.read_record(rec.path, embedding_shape=shape, input_size=input_size)
      labels = reading.read_mask(ex.mask_path, binary_components=binary_components)
      ids = select_objects(reading.object_ids(labels), max_objects=max_objects_per_image,
                           stem=ex.stem)
      size = tuple(int(v) for v in r["original_size"])
      boxes = preprocess.to_input_frame(
          preprocess.boxes_from_labels(labels, ids).reshape(-1, 2, 2), size,
          input_size).reshape(-1, 4)
      points = preprocess.to_input_frame(preprocess.interior_points(labels, ids), size,
                                         input_size)
      self.images.append(_TestImage(
          example=ex, embedding=r["embedding"], original_size=size,
          reshaped_size=tuple(int(v) for v in r["reshaped_size"]), labels=labels, ids=ids,
          boxes=boxes, points=points))
    self.clients = list(clients) if clients is not None else None
    if self.clients is not None and len(self.clients) != len(self.images):
      raise ValueError(f"{len(self.clients)} clients for {len(self.images)} test images")
    self.corrections = corrections
    self.automatic_settings = automatic_settings
    self.show_progress = False  # A progress bar over images on stderr (`evaluate`).
    self._generators: dict[tf.keras.Model, automatic.AutomaticMaskGenerator] = {}
    # One compiled forward per model (the run's decoder, the zero-shot one of the
    # overlays), shapes relaxed: no retracing per chunk size or model switch; one
    # decoder per evaluation prompt mode, filled with the evaluated weights.
    self._forwards: dict[tf.keras.Model, object] = {}
    self._decoders: dict[str, decoder_lib.PromptMaskDecoder] = {}
    # Model -> its own image embeddings (id of the test image -> embedding).
    self._embeddings: dict[tf.keras.Model, dict[int, np.ndarray]] = {}

  def set_image_embeddings(self, model: tf.keras.Model,
                           embeddings: Optional[Sequence[np.ndarray]]) -> None:
    """Evaluates `model` on these embeddings (one per test image, in `images` order),
    e.g. its adapted encoder's, instead of the cached ones; None: the cached ones."""
    if embeddings is None:
      self._embeddings.pop(model, None)
      return
    if len(embeddings) != len(self.images):
      raise ValueError(f"{len(embeddings)} embeddings for {len(self.images)} test images")
    self._embeddings[model] = {id(im): np.asarray(e, np.float32)
                               for im, e in zip(self.images, embeddings)}

  @property
  def num_objects(self) -> int:
    return sum(len(im.ids) for im in self.images)

  def _compiled(self, model: tf.keras.Model):
    if model not in self._forwards:
      self._forwards[model] = tf.function(lambda x: model(x, training=False)["masks"],
                                          reduce_retracing=True)
    return self._forwards[model]

  def _decoder(self, model: tf.keras.Model, mode: str) -> tf.keras.Model:
    """`model` itself if its prompt mode is `mode`, else this evaluator's decoder for
    `mode` carrying `model`'s weights."""
    if getattr(model, "prompt_mode", None) == mode and not hasattr(model, "decoder"):
      return model
    if mode not in self._decoders:
      self._decoders[mode] = decoder_lib.PromptMaskDecoder(self._config, prompt=mode)
    decoder_lib.copy_prompt_decoder_weights(model, self._decoders[mode])
    return self._decoders[mode]

  def _run(self, model: tf.keras.Model, image: _TestImage, embedding: np.ndarray, *,
           points: np.ndarray, labels: np.ndarray, mask_inputs: Optional[np.ndarray] = None):
    return inference.masks_at_original_size(
        self._compiled(model), self._processor, embedding=embedding,
        boxes=image.boxes, points=points, point_labels=labels,
        original_size=image.original_size, reshaped_size=image.reshaped_size,
        chunk=self._chunk, mask_inputs=mask_inputs, return_logits=True)

  def predict(self, model: tf.keras.Model, image: _TestImage,
              eval_prompt: Optional[str] = None) -> np.ndarray:
    """Boolean masks (K, H, W) at the original resolution, one per object.

    Args:
      model: A `PromptMaskDecoder` (or any model with its weights, e.g. `TFSamModel`
        when `eval_prompt` is given).
      image: A test image of `images`.
      eval_prompt: `config.EVAL_PROMPTS`; None: the prompts of `model`'s own prompt
        mode (box, interior point, or both).
    """
    k = len(image.ids)
    points, labels = image.points.reshape(k, 1, 2), np.ones((k, 1), np.int32)
    embedding = self._embeddings.get(model, {}).get(id(image), image.embedding)
    if eval_prompt is None:
      return self._run(model, image, embedding, points=points, labels=labels)[0]
    if eval_prompt == config_lib.POINT_EVAL:
      return self._run(self._decoder(model, config_lib.POINTS_PROMPT), image, embedding,
                       points=points, labels=labels)[0]
    masks, logits = self._run(self._decoder(model, config_lib.BOX_PROMPT), image, embedding,
                              points=points, labels=labels)
    if eval_prompt == config_lib.BOX_EVAL:
      return masks
    if eval_prompt != config_lib.CORRECTIONS_EVAL:
      raise ValueError(f"unknown evaluation prompt {eval_prompt!r}")
    both = self._decoder(model, config_lib.BOTH_PROMPTS)
    truth = np.stack([image.labels == obj for obj in image.ids]) if k else masks
    clicks, click_labels = np.zeros((k, 0, 2), np.float32), np.zeros((k, 0), np.int32)
    for _ in range(self.corrections):
      xy, lab = inference.correction_clicks(masks, truth)
      xy = preprocess.to_input_frame(xy[:, None], image.original_size,
                                     sam_lib.image_size(self._config))
      clicks = np.concatenate([clicks, xy.astype(np.float32)], axis=1)
      click_labels = np.concatenate([click_labels, lab[:, None]], axis=1)
      masks, logits = self._run(both, image, embedding, points=clicks, labels=click_labels,
                                mask_inputs=logits)
    return masks

  def generator(self, model: tf.keras.Model) -> automatic.AutomaticMaskGenerator:
    """The automatic mask generator with `model`'s weights (made once per model)."""
    decoder = self._decoder(model, config_lib.POINTS_PROMPT)
    if decoder not in self._generators:
      self._generators[decoder] = automatic.AutomaticMaskGenerator(
          self._bundle, settings=self.automatic_settings, decoder=decoder)
    return self._generators[decoder]

  def segment(self, model: tf.keras.Model, image: _TestImage) -> np.ndarray:
    """`image`'s label image by automatic segmentation with `model`'s weights."""
    found = self.generator(model).from_embedding(
        self._embeddings.get(model, {}).get(id(image), image.embedding),
        original_size=image.original_size, reshaped_size=image.reshaped_size)
    return automatic.label_image(found, image.original_size)

  def __call__(self, model: tf.keras.Model, *, eval_prompt: Optional[str] = None,
               client: Optional[str] = None) -> EvalResult:
    """Dice, IoU (per object) and mSA/SA50/SA75 (per image) of `model` on the test set.

    `eval_prompt` as in `predict`, or `automatic` (`segment`: mSA/SA50/SA75 and the
    objects found only); None counts as `box` or `point` by the model's mode.
    `client`: only that evaluation client's images (the evaluator's `clients`).
    Objects left out by `max_objects_per_image` are left out of the ground-truth label
    image too, so the instance metrics judge the prompted objects only.
    """
    if client is not None and (self.clients is None or client not in self.clients):
      raise ValueError(f"{client!r} is not an evaluation client of this evaluator")
    if eval_prompt is None:
      eval_prompt = config_lib.default_eval_prompt(getattr(model, "prompt_mode",
                                                           config_lib.BOX_PROMPT))
    if eval_prompt == config_lib.AUTOMATIC_EVAL:
      self.generator(model).tally = automatic.Tally()
    scores: dict[Optional[str], list] = {}  # Client -> one dict per image.
    for index, image in terminal.progress_bar(
        enumerate(self.images), total=len(self.images), desc=f"evaluating ({eval_prompt})",
        unit="img", disable=not self.show_progress):
      owner = self.clients[index] if self.clients is not None else None
      if client is None or owner == client:
        scores.setdefault(owner, []).append(self._score_image(model, image, eval_prompt))
    by_client = {} if self.clients is None else {
        c: _summary(scored, eval_prompt) for c, scored in sorted(scores.items())}
    summary = _summary([i for scored in scores.values() for i in scored], eval_prompt)
    if eval_prompt == config_lib.AUTOMATIC_EVAL and not summary["objects_found"]:
      generator = self.generator(model)
      summary["hint"] = generator.tally.hint(generator.settings)
    return EvalResult(eval_prompt=eval_prompt, by_client=by_client, **summary)

  def _score_image(self, model: tf.keras.Model, image: _TestImage, eval_prompt: str) -> dict:
    """One image's (Dice, IoU) pairs per object and its SA scores (or objects found)."""
    if eval_prompt == config_lib.AUTOMATIC_EVAL:
      found = self.segment(model, image)
      return {"pairs": [], "sa": instance_metrics.segmentation_accuracy(image.labels, found),
              "objects": len(reading.object_ids(image.labels)), "found": int(found.max())}
    pred = self.predict(model, image, eval_prompt)
    truth = np.where(np.isin(image.labels, image.ids), image.labels, 0)
    return {"pairs": [losses.dice_iou(pred[k], image.labels == obj)
                      for k, obj in enumerate(image.ids)],
            "sa": instance_metrics.segmentation_accuracy(
                truth, instance_metrics.stitch_masks(list(pred), shape=image.original_size)),
            "objects": len(image.ids)}


def _summary(images: Sequence[dict], eval_prompt: str) -> dict:
  """Scores over images (`Evaluator._score_image`): Dice and IoU averaged over objects,
  the SA scores over images."""
  def mean(values):
    return float(np.mean(values)) if len(values) else float("nan")

  pairs = [p for i in images for p in i["pairs"]]
  out = {"dice": mean([p[0] for p in pairs]), "iou": mean([p[1] for p in pairs]),
         **{m: mean([i["sa"].get(m, 0.0) for i in images]) for m in ("msa", "sa50", "sa75")},
         "num_objects": sum(i["objects"] for i in images), "num_images": len(images)}
  if eval_prompt == config_lib.AUTOMATIC_EVAL:
    out["objects_found"] = sum(i["found"] for i in images)
  return out


def adapted_embeddings(model: tf.keras.Model, records: Sequence[cache.Record], *,
                       pipeline_spec) -> list[np.ndarray]:
  """Image embeddings of `records` by an adapted model's encoder (`AdaptedSamModel.embed`).

  Args:
    model: The `AdaptedSamModel` holding the weights to evaluate.
    records: The test images' records in the model's input format (features or
      images), in the evaluator's image order.
    pipeline_spec: A `pipeline.PipelineSpec` of that format (shapes, normalization).

  Returns:
    One (C, s, s) embedding per record.
  """
  embed = model.embed_fn()
  key = "pixel_values" if pipeline_spec.normalization is not None else "features"
  out = []
  for rec in records:
    r = cache.read_record(rec.path, embedding_shape=pipeline_spec.embedding_shape,
                          input_size=pipeline_spec.input_size,
                          normalization=pipeline_spec.normalization,
                          feature_shape=pipeline_spec.feature_shape)
    out.append(embed(tf.constant(r[key][None])).numpy()[0])
  return out


def evaluate_folder(*, model: str, data_dir: Optional[str],
                    data_name: str = config_lib.SAMPLE_DATASET, split: str = "auto",
                    eval_prompts: Sequence[str] = (config_lib.BOX_EVAL, config_lib.POINT_EVAL),
                    corrections: int = 3,
                    automatic_settings: Optional[config_lib.AutomaticSettings] = None,
                    binary_components: bool = False, max_objects_per_image: int = 0,
                    cache_dir: Optional[str] = None, encode_batch_size: int = 4) -> dict:
  """Evaluates a model (by name) on a data folder; what `experiments.evaluate` prints.

  The same evaluation as a run's held-out one (`Evaluator`), by evaluation client: one
  per `test/<site>/` folder (split `test`), or per site folder (split `all`).

  Args:
    model: `tiny`, a hub id or a `save_pretrained` directory.
    data_dir: Data folder; None for the named dataset `data_name`.
    data_name: Embedded dataset (`sample` or `synthetic`) used without `data_dir`.
    split: `test` (the `test/` folder), `all` (every image) or `auto` (test/ if any).
    eval_prompts: `config.EVAL_PROMPTS` to evaluate, each reported apart.
    corrections: Corrective points of `box_corrections`.
    automatic_settings: The `automatic` evaluation's settings (default SAM's).
    binary_components: How binary masks are split into objects.
    max_objects_per_image: Cap on prompted objects per image (0 = all).
    cache_dir: Cache root.
    encode_batch_size: Images per encoder call.

  Returns:
    A JSON-ready dict: `model`, `data_dir`, `split`, `results` (evaluation prompt ->
    scores, with `by_client`), and the first prompt's `dice`, `iou`, `num_objects`.

  Raises:
    errors.UserError: Bad model, folder or files.
  """
  cache_root = Path(cache_dir).expanduser() if cache_dir else fileio.default_cache_dir()
  root = datasets.dataset_root(data_dir=data_dir, data=data_name, cache_root=cache_root)
  if not root.is_dir():
    raise errors.DataError(root, "data directory not found")
  test_dir = root / discovery.TEST_DIR
  if split == "test" or (split == "auto" and test_dir.is_dir()):
    by_client, used = discovery.list_test_clients(test_dir), "test"
  else:
    splits = discovery.discover_splits(root, partition="iid", num_clients=1,
                                       dirichlet_alpha=1.0, test_fraction=0.0, seed=0)
    by_client, used = {**splits.clients, **splits.test_clients}, "all"
  examples = [e for exs in by_client.values() for e in exs]
  bundle = build.load_sam(model, cache_dir=cache_root)
  records, _ = cache.build_records(
      examples, bundle=bundle, cache_root=cache_root, binary_components=binary_components,
      batch_size=encode_batch_size)
  evaluator = Evaluator(examples=examples, records=records, bundle=bundle,
                        binary_components=binary_components,
                        max_objects_per_image=max_objects_per_image,
                        clients=[c for c, exs in by_client.items() for _ in exs],
                        corrections=corrections, automatic_settings=automatic_settings)
  evaluator.show_progress = True
  decoder = build.build_prompt_mask_decoder(bundle)
  results = {p: evaluator(decoder, eval_prompt=p).to_dict() for p in eval_prompts}
  first = results[eval_prompts[0]]
  return {"model": model, "data_dir": str(root), "split": used, "dice": first["dice"],
          "iou": first["iou"], "num_objects": first["num_objects"], "results": results}
