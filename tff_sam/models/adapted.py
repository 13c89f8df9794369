"""The LoRA-adapted SAM that TFF trains: adapters and decoder travel, the base stays.

`AdaptedSamModel` is the image encoder with LoRA (`lora`) in front of
`PromptMaskDecoder`. What trains, and so what TFF's `ModelWeights` (its state,
broadcast, aggregation and checkpoints) hold, is the adapters, the mask decoder and
the prompt encoder's few frozen weights, as in decoder-only training.

The encoder's base weights are not model weights. In a federation every site already
holds the public pretrained model, as it holds its images, so they need not travel
every round (a Keras model's non-trainable weights would: TFF broadcasts them, which
is what online mode does with the whole encoder). Here they are the *site copy*
(`SiteWeights`): one raw float32 file written once into the cache by
`write_site_weights`, content-addressed by the encoder's fingerprint. Building the
encoder under `SiteWeights.creating()` makes each base weight a variable whose
initial value is read from that file by the computation that runs the model (TFF
initializes a computation's variables before running it), and the model leaves those
variables out of `trainable_weights` / `non_trainable_weights`. Every machine that
runs clients (TFF's local worker, or each `--workers` machine) needs the file at the
same path, as it needs the clients' records.

The model reads either pixel values (online, `start=None`) or the encoder's
activations at `start` (`encoders.features`; the adapted model's feature cache: the
frozen stages before the first adapted block run once per image, not every step).
"""

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam import fileio
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import encoders
from tff_sam.models import lora as lora_lib
from tff_sam.models import sam as sam_lib

SITE_WEIGHTS_DIR = "site_weights"
_SITE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SiteWeights:
  """The site copy of an encoder's base weights: a raw float32 file and its layout.

  Attributes:
    path: Absolute path of the file: every weight, little-endian float32, in the
      order the encoder creates its variables.
    image_encoder: The encoder's kind (`sam.VIT_ENCODER`, `sam.TINYVIT_ENCODER`).
    names: The weights' names (`encoders.weight_names`), in that order.
    shapes: Their shapes.
  """

  path: str
  image_encoder: str
  names: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]

  @property
  def num_values(self) -> int:
    return int(sum(np.prod(s, dtype=np.int64) for s in self.shapes))

  @contextlib.contextmanager
  def creating(self) -> Iterator[list[tf.Variable]]:
    """Variables created inside take their initial values from the file, in order.

    Yields the list the created variables are appended to. Each is created
    non-trainable (no gradient tape watches it); the i-th must have the i-th shape,
    and exactly `len(shapes)` must be created.

    Raises:
      ValueError: The variables created do not match the layout.
    """
    created: list[tf.Variable] = []
    offsets = np.concatenate([[0], np.cumsum([np.prod(s, dtype=np.int64) for s in self.shapes])])
    flat_by_graph: dict = {}

    def flat() -> tf.Tensor:
      key = "eager" if tf.executing_eagerly() else id(tf.compat.v1.get_default_graph())
      if key not in flat_by_graph:
        with tf.device("/cpu:0"):
          flat_by_graph[key] = tf.io.decode_raw(tf.io.read_file(self.path), tf.float32,
                                                little_endian=True)
      return flat_by_graph[key]

    def creator(next_creator, **kwargs):
      if not _is_weight(kwargs.get("dtype")):
        return next_creator(**kwargs)
      i = len(created)
      if i >= len(self.shapes):
        raise ValueError(f"the encoder creates more than the {len(self.shapes)} weights of "
                         f"{self.path}")
      shape, start, stop = self.shapes[i], int(offsets[i]), int(offsets[i + 1])
      declared = kwargs.get("shape")
      if declared is not None and tuple(tf.TensorShape(declared).as_list()) != tuple(shape):
        raise ValueError(f"{self.names[i]}: the encoder's weight has shape "
                         f"{tuple(tf.TensorShape(declared).as_list())}, {self.path} holds "
                         f"{tuple(shape)}")
      kwargs["initial_value"] = lambda: tf.reshape(flat()[start:stop], shape)
      kwargs["trainable"] = False
      variable = next_creator(**kwargs)
      created.append(variable)
      return variable

    with tf.variable_creator_scope(creator):
      yield created
    if len(created) != len(self.shapes):
      raise ValueError(f"the encoder created {len(created)} weights, {self.path} holds "
                       f"{len(self.shapes)}")


def _is_weight(dtype) -> bool:
  """Whether a variable of `dtype` is a weight (Keras models also make int64 counters)."""
  return dtype is None or tf.as_dtype(dtype).is_floating


def encoder_layout(kind: str, config) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
  """(names, shapes) of an encoder's weights in the order it creates them."""
  created = []

  def recorder(next_creator, **kwargs):
    variable = next_creator(**kwargs)
    if _is_weight(variable.dtype):
      created.append(variable)
    return variable

  with tf.variable_creator_scope(recorder):
    encoder = encoders.build_image_encoder(kind, config)
  names = encoders.weight_names(encoder, kind)
  return (tuple(names[id(v)] for v in created), tuple(tuple(int(d) for d in v.shape)
                                                       for v in created))


def write_site_weights(bundle: sam_lib.SamBundle, *, cache_root: Path) -> SiteWeights:
  """The site copy of the bundle's encoder, written once into the cache.

  `<cache_root>/site_weights/<fingerprint>-<kind>.f32` with its index `.json` (names,
  shapes, SHA-256), written atomically, the index last; a file whose index is
  missing or whose checksum does not match is written again.

  Returns:
    Its `SiteWeights`.
  """
  kind = sam_lib.encoder_kind(bundle)
  names, shapes = encoder_layout(kind, bundle.config)
  stem = Path(cache_root).expanduser().resolve() / SITE_WEIGHTS_DIR / f"{bundle.fingerprint}-{kind}"
  data_path, index_path = stem.with_suffix(".f32"), stem.with_suffix(".json")
  site = SiteWeights(path=str(data_path), image_encoder=kind, names=names, shapes=shapes)
  try:
    index = json.loads(index_path.read_text())
  except (OSError, ValueError):
    index = None
  expected = {"version": _SITE_VERSION, "names": list(names), "shapes": [list(s) for s in shapes]}
  if (index is not None and {k: index.get(k) for k in expected} == expected
      and data_path.is_file() and data_path.stat().st_size == 4 * site.num_values
      and fileio.sha256_file(data_path) == index.get("sha256")):
    return site
  source = encoders.bundle_encoder(bundle)
  source_names = encoders.weight_names(source, kind)
  by_name = {source_names[id(v)]: v for v in source.weights if id(v) in source_names}
  missing = [n for n in names if n not in by_name]
  if missing:
    raise errors.ModelError(f"{bundle.name}: its image encoder lacks {', '.join(missing[:5])}")
  with fileio.atomic_path(data_path) as tmp:
    with open(tmp, "wb") as f:
      for name, shape in zip(names, shapes):
        value = np.asarray(by_name[name].numpy(), dtype="<f4")
        if value.shape != shape:
          raise errors.ModelError(f"{bundle.name}: {name} has shape {value.shape}, expected "
                                  f"{shape}")
        f.write(value.tobytes())
  fileio.write_json(index_path, {**expected, "sha256": fileio.sha256_file(data_path),
                                 "bytes": 4 * site.num_values, "image_encoder": kind,
                                 "model": bundle.name})
  return site


@dataclasses.dataclass(frozen=True)
class AdapterSetup:
  """What an adapted TFF model needs besides the SAM config.

  Attributes:
    lora: Rank, scale and targets of the adapters.
    site: The site copy of the encoder's base weights (and the encoder's kind).
    start: Where inputs enter the encoder: None = pixel values (online), else the
      stage/block whose activations the feature cache holds.
  """

  lora: lora_lib.LoraSpec
  site: SiteWeights
  start: Optional[int]

  def feature_shape(self, config) -> Optional[tuple[int, int, int]]:
    """(h, w, c) of the cached features, None online."""
    if self.start is None:
      return None
    return encoders.cut_shape(self.site.image_encoder, config, start=self.start)


class AdaptedSamModel(tf.keras.Model):
  """Image encoder with LoRA + `PromptMaskDecoder`: the model of `--adapter=lora`.

  Inputs are `PromptMaskDecoder`'s with, instead of `image_embeddings`, either
  `pixel_values` (B, 3, S, S) (`start=None`) or `features` (B, h, w, c), the encoder's
  activations at `start` (`encoders.features`). Outputs are the decoder's.

  `trainable_weights` are the adapters' and the decoder's; `non_trainable_weights` the
  decoder's frozen ones; the encoder's base weights (the site copy) are in neither.

  Attributes:
    image_encoder: The encoder (base weights from the site copy, adapters inside).
    adapters: Its `lora.Adapter`s.
    lora: Their `lora.LoraSpec`.
    decoder: The `PromptMaskDecoder` (evaluation and export use it).
    start: Where the inputs enter the encoder (None: pixel values).
  """

  def __init__(self, config, *, encoder: str, lora: lora_lib.LoraSpec, site: SiteWeights,
               start: Optional[int], prompt: str = config_lib.BOX_PROMPT,
               train_iou_head: bool = True, sub_iterations: int = 3, **kwargs):
    """Builds the architecture (base weights from `site`; see `build.build_adapted_model`)."""
    super().__init__(**kwargs)
    with site.creating() as created:
      self.image_encoder = encoders.build_image_encoder(encoder, config)
    # Plain attributes, not tracked by Keras.
    object.__setattr__(self, "_site_ids", frozenset(id(v) for v in created))
    object.__setattr__(self, "adapters", lora_lib.add_lora(self.image_encoder, kind=encoder,
                                                           spec=lora))
    self.encoder_kind = encoder
    self.lora = lora
    self.start = start
    self.decoder = decoder_lib.PromptMaskDecoder(config, prompt=prompt,
                                                 train_iou_head=train_iou_head,
                                                 sub_iterations=sub_iterations)
    self.built = True

  @property
  def trainable_weights(self):
    return [w for w in super().trainable_weights if id(w) not in self._site_ids]

  @property
  def non_trainable_weights(self):
    return [w for w in super().non_trainable_weights if id(w) not in self._site_ids]

  def embed(self, inputs) -> tf.Tensor:
    """The adapted encoder's image embeddings (B, C, s, s) of `pixel_values` or `features`."""
    if self.start is None:
      return encoders.embed(self.image_encoder, self.encoder_kind, inputs["pixel_values"])
    return encoders.from_features(self.image_encoder, self.encoder_kind,
                                  tf.cast(inputs["features"], tf.float32), start=self.start)

  def call(self, inputs, training=False):
    decoder_inputs = {k: v for k, v in inputs.items() if k not in ("pixel_values", "features")}
    decoder_inputs["image_embeddings"] = self.embed(inputs)
    return self.decoder(decoder_inputs, training=training)

  def embed_fn(self) -> Callable[[tf.Tensor], tf.Tensor]:
    """A compiled `embed` of one input tensor (features or pixel values), built once."""
    if getattr(self, "_embed_fn", None) is None:
      key = model_inputs_key(self.start)
      object.__setattr__(self, "_embed_fn", tf.function(
          lambda x: self.embed({key: x}), reduce_retracing=True))
    return self._embed_fn


def describe_adapters(model: AdaptedSamModel, site: SiteWeights) -> str:
  """One line on an adapted model: its adapters, what trains and travels, the site copy."""
  spec = model.lora
  decoder = sum(int(np.prod(w.shape)) for w in model.decoder.trainable_weights)
  return (f"adapter: LoRA rank {spec.rank} (alpha {spec.alpha:g}) on {','.join(spec.targets)} "
          f"of every transformer block of the {model.encoder_kind} encoder: "
          f"{len(model.adapters)} adapters, {lora_lib.count_parameters(model.adapters):,} "
          f"parameters, trained and sent with the decoder's {decoder:,}; the base weights "
          f"stay on the sites ({site.path}, {4 * site.num_values / 1e6:.1f} MB)")


def feature_start(kind: str, *, embedding_cache: bool) -> Optional[int]:
  """Where an adapted model's inputs enter an encoder of `kind`: None (pixel values)
  online, else the first stage with transformer blocks, i.e. with adapters (the
  stages before it are frozen and run once per image, into the feature cache)."""
  return encoders.first_block_stage(kind) if embedding_cache else None


def model_inputs_key(start: Optional[int]) -> str:
  """The input an adapted model with `start` reads: `pixel_values` or `features`."""
  return "pixel_values" if start is None else "features"
