"""PyTorch zip checkpoints <-> NumPy arrays, without torch and without running code.

`torch.save` writes a zip archive holding `PREFIX/data.pkl` (a pickle of the state dict
whose tensors refer to storages by key) and one raw little-endian file per storage at
`PREFIX/data/KEY`. A pickle can name and call any importable function, so this module
unpickles with an allow-list: only the globals torch uses to rebuild tensors and
parameters, the storage classes and `collections.OrderedDict` resolve; any other global
is refused with `errors.ModelError` before anything is called. `save_torch_state_dict`
writes the same format (what transformers' PyTorch `from_pretrained` reads as
`pytorch_model.bin`).
"""

import collections
import dataclasses
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import numpy as np

from tff_sam import errors
from tff_sam import fileio

# Storage class name (as pickled under module `torch`) -> little-endian dtype.
# BFloat16 has no NumPy dtype; it is widened to float32 below.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}

_MAX_DIMS = 32
_MAX_ELEMENTS = 1 << 31  # Per tensor; refuses absurd (e.g. zero-stride) views.


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands in for `torch.<Name>Storage` in the unpickled data."""
  name: str

  @property
  def dtype(self) -> np.dtype:
    return _STORAGE_DTYPES[self.name]


@dataclasses.dataclass(frozen=True)
class _Storage:
  """A storage resolved from the archive: a flat array of its dtype."""
  name: str
  array: np.ndarray


def _to_array(storage: Any, offset: Any, size: Any, stride: Any) -> np.ndarray:
  """Views `storage` with torch's (offset, size, stride) and returns a contiguous copy."""
  if not isinstance(storage, _Storage):
    raise ValueError(f"tensor storage is {type(storage).__name__}, not a storage")
  size, stride = tuple(size), tuple(stride)
  if (len(size) != len(stride) or len(size) > _MAX_DIMS or
      not all(isinstance(v, int) and v >= 0 for v in size + stride + (offset,))):
    raise ValueError(f"invalid tensor geometry size={size} stride={stride} offset={offset}")
  flat = storage.array
  if int(np.prod(size, dtype=np.float64)) > _MAX_ELEMENTS:
    raise ValueError(f"tensor of size {size} is too large")
  if 0 in size:
    out = np.zeros(size, dtype=flat.dtype)
  else:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
      raise ValueError(f"tensor of size {size} at offset {offset} overruns its storage "
                       f"of {flat.size} elements")
    out = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * flat.itemsize for s in stride),
        writeable=False).copy()
  if storage.name == "BFloat16Storage":
    out = (out.astype(np.uint32) << 16).view(np.float32)
  return out


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):  # pylint: disable=unused-argument
  return _to_array(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False,
                       backward_hooks=None):  # pylint: disable=unused-argument
  return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None,
                                  state=None):  # pylint: disable=unused-argument
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
}
_ALLOWED_GLOBALS.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})


class _RefusedGlobal(Exception):

  def __init__(self, module: str, name: str):
    super().__init__(f"{module}.{name}")
    self.qualname = f"{module}.{name}"


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only `_ALLOWED_GLOBALS` and storages from the archive."""

  def __init__(self, file, zf: zipfile.ZipFile, prefix: str):
    super().__init__(file)
    self._zf = zf
    self._prefix = prefix
    self._storages: Dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise _RefusedGlobal(module, name) from None

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise ValueError(f"unsupported persistent id {pid!r:.80}")
    _, storage_type, key, _, numel = pid
    if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
      raise ValueError(f"unsupported storage reference {pid!r:.80}")
    if key not in self._storages:
      member = f"{self._prefix}data/{key}"
      try:
        raw = self._zf.read(member)
      except KeyError:
        raise ValueError(f"missing storage member {member}") from None
      dtype = storage_type.dtype
      if len(raw) % dtype.itemsize or (isinstance(numel, int) and
                                        len(raw) // dtype.itemsize < numel):
        raise ValueError(f"storage {member} has {len(raw)} bytes, expected {numel} "
                         f"elements of {dtype.itemsize} bytes")
      self._storages[key] = _Storage(storage_type.name, np.frombuffer(raw, dtype=dtype))
    return self._storages[key]


def _find_pickle(zf: zipfile.ZipFile) -> Tuple[str, str]:
  """Returns (member name of data.pkl, archive prefix ending in '/')."""
  pkls = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
  # The top-level record is `PREFIX/data.pkl`; nested ones (unusual) are ignored.
  pkls.sort(key=lambda n: n.count("/"))
  if not pkls:
    raise ValueError("zip archive has no data.pkl (not a torch.save checkpoint)")
  name = pkls[0]
  return name, name[:-len("data.pkl")]


def _select_state_dict(obj: Any) -> Dict[str, Any]:
  if isinstance(obj, dict):
    for key in ("model", "state_dict"):
      inner = obj.get(key)
      if isinstance(inner, dict) and inner and all(
          isinstance(v, np.ndarray) for v in inner.values()):
        return inner
    return obj
  raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state dict")


def load_torch_state_dict(path: Union[str, os.PathLike]) -> Dict[str, np.ndarray]:
  """Loads a `torch.save` zip checkpoint's state dict as NumPy arrays.

  The checkpoint may be the state dict itself or a dict holding it under `model` or
  `state_dict`. Only tensors (and parameters) are accepted as values.

  Args:
    path: The checkpoint file (`.pt`/`.pth` written by torch >= 1.6).

  Returns:
    Parameter name -> array (C-contiguous copy, the tensor's dtype; bfloat16 becomes
    float32), in the checkpoint's order.

  Raises:
    errors.ModelError: The file is missing, not a torch zip checkpoint, refers to a
      global outside the allow-list, or is malformed.
  """
  path = Path(path)
  if not path.is_file():
    raise errors.ModelError(f"{path}: no such checkpoint file")
  try:
    with zipfile.ZipFile(path) as zf:
      member, prefix = _find_pickle(zf)
      byteorder = f"{prefix}byteorder"
      if byteorder in zf.namelist() and zf.read(byteorder).strip() != b"little":
        raise ValueError("big-endian checkpoints are not supported")
      with zf.open(member) as f:
        obj = _RestrictedUnpickler(f, zf, prefix).load()
  except _RefusedGlobal as e:
    raise errors.ModelError(
        f"{path}: refusing to load, its pickle references the disallowed global "
        f"{e.qualname}") from None
  except zipfile.BadZipFile:
    raise errors.ModelError(
        f"{path}: not a zip-format torch checkpoint (legacy torch.save format or a "
        f"different file)") from None
  except (ValueError, TypeError, AttributeError, IndexError, EOFError, KeyError,
          pickle.UnpicklingError) as e:
    raise errors.ModelError(f"{path}: malformed torch checkpoint ({e})") from None
  try:
    state = _select_state_dict(obj)
  except ValueError as e:
    raise errors.ModelError(f"{path}: {e}") from None
  out: Dict[str, np.ndarray] = {}
  for key, value in state.items():
    if not isinstance(key, str) or not isinstance(value, np.ndarray):
      raise errors.ModelError(
          f"{path}: entry {key!r:.60} is a {type(value).__name__}, not a tensor")
    out[key] = value
  return out


def _pickle_str(text: str) -> bytes:
  data = text.encode("utf-8")
  return b"X" + struct.pack("<I", len(data)) + data  # BINUNICODE


def _pickle_int(value: int) -> bytes:
  if 0 <= value < 256:
    return b"K" + bytes([value])  # BININT1
  return b"J" + struct.pack("<i", value)  # BININT (every tensor here fits)


def _pickle_int_tuple(values) -> bytes:
  return b"(" + b"".join(_pickle_int(int(v)) for v in values) + b"t"


_ORDERED_DICT = b"ccollections\nOrderedDict\n)R"  # GLOBAL, EMPTY_TUPLE, REDUCE
_REBUILD = b"ctorch._utils\n_rebuild_tensor_v2\n"
_TORCH_STORAGE_NAMES = {np.dtype("<f4"): "FloatStorage", np.dtype("<i8"): "LongStorage",
                        np.dtype("<f2"): "HalfStorage", np.dtype("<f8"): "DoubleStorage"}


def _state_dict_pickle(arrays: list[np.ndarray], keys: list[str]) -> bytes:
  """The pickle `torch.save` writes for an OrderedDict of contiguous tensors."""
  out = bytearray(b"\x80\x02" + _ORDERED_DICT + b"(")  # PROTO 2, OrderedDict(), MARK
  for index, (key, array) in enumerate(zip(keys, arrays)):
    storage = _TORCH_STORAGE_NAMES[array.dtype]
    strides = [s // array.itemsize for s in array.strides]
    out += _pickle_str(key) + _REBUILD + b"("
    out += (b"(" + _pickle_str("storage") + f"ctorch\n{storage}\n".encode() +
            _pickle_str(str(index)) + _pickle_str("cpu") + _pickle_int(array.size) +
            b"tQ")  # TUPLE, BINPERSID: the storage of this tensor
    out += _pickle_int(0) + _pickle_int_tuple(array.shape) + _pickle_int_tuple(strides)
    out += b"\x89" + _ORDERED_DICT + b"tR"  # requires_grad False, hooks; TUPLE, REDUCE
  out += b"u."  # SETITEMS, STOP
  return bytes(out)


def save_torch_state_dict(path: Union[str, os.PathLike], tensors: Dict[str, np.ndarray],
                          *, prefix: str = "archive") -> Path:
  """Writes a state dict as `torch.save` would (zip format), without torch.

  The archive holds `PREFIX/data.pkl` (only the globals `torch.load(weights_only=True)`
  accepts: `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and storage
  classes), `PREFIX/byteorder`, `PREFIX/version` and one little-endian file per tensor
  at `PREFIX/data/<index>`; `load_torch_state_dict` reads it back. Written atomically.

  Args:
    path: Destination file (e.g. `pytorch_model.bin`).
    tensors: Name -> float32/float16/float64/int64 array.
    prefix: The archive's top-level folder.

  Returns:
    `path`.
  """
  keys = list(tensors)
  arrays = [np.asarray(tensors[k], order="C") for k in keys]
  for key, array in zip(keys, arrays):
    if array.dtype.newbyteorder("<") not in _TORCH_STORAGE_NAMES:
      raise ValueError(f"{key}: unsupported dtype {array.dtype}")
  arrays = [a.astype(a.dtype.newbyteorder("<"), copy=False) for a in arrays]
  with fileio.atomic_path(path) as tmp:
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
      zf.writestr(f"{prefix}/data.pkl", _state_dict_pickle(arrays, keys))
      zf.writestr(f"{prefix}/byteorder", "little")
      for index, array in enumerate(arrays):
        zf.writestr(f"{prefix}/data/{index}", array.tobytes())
      zf.writestr(f"{prefix}/version", "3\n")
  return Path(path)
