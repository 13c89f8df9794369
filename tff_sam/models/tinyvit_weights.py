"""MobileSAM's TinyViT weights: its PyTorch state dict and the converted `.npz` cache.

`load_tinyvit_state_dict` assigns a MobileSAM checkpoint's `image_encoder.*` tensors to
the Keras port (`tinyvit`), by the keys `TinyViT.torch_params()` lists;
`torch_state_dict` is the inverse; `save_tinyvit_weights` / `load_tinyvit_weights`
write and read the converted weights as one `.npz` (Keras layout, torch names).
"""

import os
import zipfile
from typing import Dict, Mapping, Sequence, Union

import numpy as np

from tff_sam import errors
from tff_sam import fileio
from tff_sam.models import tinyvit

# Checkpoint entries the encoder's forward pass never reads: the ImageNet classifier
# head kept from TinyViT's pretraining and BatchNorm's step counters.
_UNUSED_KEY_SUFFIXES = (".num_batches_tracked",)
_UNUSED_KEY_PREFIXES = ("norm_head.", "head.")

_FORMAT_VERSION = 1
_META_IMG_SIZE = "__meta__/img_size"
_META_VERSION = "__meta__/format_version"


def is_unused_key(name: str) -> bool:
  """Whether a MobileSAM `image_encoder.*` key (relative) is one SAM never uses."""
  return name.endswith(_UNUSED_KEY_SUFFIXES) or name.startswith(_UNUSED_KEY_PREFIXES)


def _format_keys(keys: Sequence[str], limit: int = 8) -> str:
  keys = sorted(keys)
  more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


def load_tinyvit_state_dict(model: tinyvit.TinyViT, state_dict: Mapping[str, np.ndarray], *,
                            prefix: str = "image_encoder.") -> None:
  """Assigns MobileSAM's PyTorch image-encoder tensors to the Keras model.

  Every variable of `model` must receive exactly one tensor of the right shape, and
  every `prefix*` tensor must be used, except the ones the encoder's forward never
  reads (`norm_head.*`, `head.*` and BatchNorm `num_batches_tracked` counters).
  Keys without `prefix` are ignored (they belong to other modules). Conv kernels
  (O, I, kh, kw) and linear weights (O, I) are transposed to Keras' layouts.

  Args:
    model: A model from `build_tinyvit`.
    state_dict: Name -> array, e.g. from `torch_checkpoint.load_torch_state_dict`.
    prefix: The encoder's key prefix in `state_dict` ("" for a bare encoder dict).

  Raises:
    errors.ModelError: Tensors are missing, unexpected or mis-shaped (all are listed).
  """
  source = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  params = model.torch_params()
  targets = {name for name, _, _ in params}
  missing = [prefix + n for n in targets if n not in source]
  unexpected = [prefix + n for n in source if n not in targets and not is_unused_key(n)]
  mis_shaped = []
  for name, var, kind in params:
    if name in source:
      want = tinyvit.torch_shape(var.shape, kind)
      got = tuple(np.shape(source[name]))
      if got != want:
        mis_shaped.append(f"{prefix}{name} {got} != {want}")
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing: {_format_keys(missing)}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected: {_format_keys(unexpected)}")
  if mis_shaped:
    problems.append(f"{len(mis_shaped)} mis-shaped: {_format_keys(mis_shaped)}")
  if problems:
    raise errors.ModelError("TinyViT state dict does not match the model: " +
                            "; ".join(problems))
  for name, var, kind in params:
    var.assign(tinyvit.to_keras(np.asarray(source[name], dtype=np.float32), kind))


def torch_state_dict(model: tinyvit.TinyViT) -> Dict[str, np.ndarray]:
  """The model's weights in MobileSAM's PyTorch layout (float32), by torch name.

  Only what the port holds: MobileSAM's unused classification head (`norm_head.*`,
  `head.*`) and BatchNorm step counters (`*.num_batches_tracked`) are not included.
  """
  return {name: np.ascontiguousarray(tinyvit.to_torch(var.numpy(), kind), dtype=np.float32)
          for name, var, kind in model.torch_params()}


def save_tinyvit_weights(model: tinyvit.TinyViT, path: Union[str, os.PathLike]) -> None:
  """Atomically writes the model's weights as an `.npz` of named arrays.

  Arrays are stored in Keras layout under their torch names, plus the input size.

  Args:
    model: The model to save.
    path: Destination file.
  """
  arrays = {name: var.numpy() for name, var, _ in model.torch_params()}
  arrays[_META_IMG_SIZE] = np.asarray(model.img_size, dtype=np.int64)
  arrays[_META_VERSION] = np.asarray(_FORMAT_VERSION, dtype=np.int64)
  with fileio.atomic_path(path, suffix=".npz") as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)


def load_tinyvit_weights(path: Union[str, os.PathLike]) -> tinyvit.TinyViT:
  """Builds a TinyViT and loads weights written by `save_tinyvit_weights`.

  Args:
    path: The `.npz` file.

  Returns:
    The model with exactly the saved weights.

  Raises:
    errors.ModelError: The file is missing, unreadable, or does not match the model.
  """
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    raise errors.ModelError(f"{path}: cannot read TinyViT weights ({e})") from None
  if int(arrays.pop(_META_VERSION, -1)) != _FORMAT_VERSION or _META_IMG_SIZE not in arrays:
    raise errors.ModelError(f"{path}: not a TinyViT weights file of format {_FORMAT_VERSION}")
  model = tinyvit.build_tinyvit(int(arrays.pop(_META_IMG_SIZE)))
  params = model.torch_params()
  names = {name for name, _, _ in params}
  missing = sorted(names - arrays.keys())
  unexpected = sorted(arrays.keys() - names)
  bad = [n for n, v, _ in params if n in arrays and tuple(arrays[n].shape) != tuple(v.shape)]
  if missing or unexpected or bad:
    raise errors.ModelError(
        f"{path}: TinyViT weights do not match the model (missing: "
        f"{_format_keys(missing) or 'none'}; unexpected: {_format_keys(unexpected) or 'none'}; "
        f"mis-shaped: {_format_keys(bad) or 'none'})")
  for name, var, _ in params:
    var.assign(arrays[name])
  return model
