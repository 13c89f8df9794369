"""Tests for tff_sam.models.torch_checkpoint: torch zip checkpoints read without torch."""

import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from tff_sam import errors
from tff_sam.models import torch_checkpoint


class _PickleAsm:
  """Writes protocol-2 pickle opcodes by hand, as torch.save lays out a state dict.

  torch is not installed, so `pickle.dumps` cannot name `torch._utils` globals; the
  opcodes below are the ones torch emits (see `pickletools.dis` of a real checkpoint).
  """

  def __init__(self):
    self.out = bytearray(pickle.PROTO + b"\x02")

  def op(self, code: bytes) -> "_PickleAsm":
    self.out += code
    return self

  def glob(self, module: str, name: str) -> "_PickleAsm":
    return self.op(pickle.GLOBAL + f"{module}\n{name}\n".encode())

  def text(self, s: str) -> "_PickleAsm":
    data = s.encode()
    return self.op(pickle.BINUNICODE + struct.pack("<I", len(data)) + data)

  def integer(self, i: int) -> "_PickleAsm":
    return self.op(pickle.BININT + struct.pack("<i", i))

  def int_tuple(self, items) -> "_PickleAsm":
    self.op(pickle.MARK)
    for i in items:
      self.integer(i)
    return self.op(pickle.TUPLE)

  def ordered_dict(self) -> "_PickleAsm":
    return self.glob("collections", "OrderedDict").op(pickle.EMPTY_TUPLE).op(pickle.REDUCE)

  def tensor(self, storage_cls: str, key: str, numel: int, offset: int, size, stride,
             parameter: bool = False) -> "_PickleAsm":
    if parameter:
      self.glob("torch._utils", "_rebuild_parameter").op(pickle.MARK)
    self.glob("torch._utils", "_rebuild_tensor_v2").op(pickle.MARK)
    self.op(pickle.MARK).text("storage").glob("torch", storage_cls).text(key).text("cpu")
    self.integer(numel).op(pickle.TUPLE).op(pickle.BINPERSID)
    self.integer(offset).int_tuple(size).int_tuple(stride).op(pickle.NEWFALSE).ordered_dict()
    self.op(pickle.TUPLE).op(pickle.REDUCE)
    if parameter:
      self.op(pickle.NEWTRUE).ordered_dict().op(pickle.TUPLE).op(pickle.REDUCE)
    return self

  def getvalue(self) -> bytes:
    return bytes(self.out + pickle.STOP)


def _write_zip(path, data_pkl: bytes, storages, prefix="archive"):
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{prefix}/data.pkl", data_pkl)
    zf.writestr(f"{prefix}/byteorder", "little")
    for key, arr in storages.items():
      zf.writestr(f"{prefix}/data/{key}", np.ascontiguousarray(arr).tobytes())
    zf.writestr(f"{prefix}/version", "3\n")


def _fabricated_state(asm: _PickleAsm) -> _PickleAsm:
  asm.ordered_dict().op(pickle.MARK)
  # A (2, 3) float32 tensor and its transpose sharing storage "0".
  asm.text("conv.weight").tensor("FloatStorage", "0", 6, 0, (2, 3), (3, 1), parameter=True)
  asm.text("conv.weight_t").tensor("FloatStorage", "0", 6, 0, (3, 2), (1, 3))
  # A slice at an offset of the same storage.
  asm.text("tail").tensor("FloatStorage", "0", 6, 4, (2,), (1,))
  asm.text("half").tensor("HalfStorage", "1", 3, 0, (3,), (1,))
  asm.text("bn.num_batches_tracked").tensor("LongStorage", "2", 1, 0, (), ())
  return asm.op(pickle.SETITEMS)


_STORAGES = {
    "0": np.arange(6, dtype="<f4") * 1.5,
    "1": np.array([0.5, -2.0, 65504.0], dtype="<f2"),
    "2": np.array([7], dtype="<i8"),
}


def _check_fabricated(sd):
  assert list(sd) == ["conv.weight", "conv.weight_t", "tail", "half", "bn.num_batches_tracked"]
  base = np.arange(6, dtype=np.float32) * 1.5
  np.testing.assert_array_equal(sd["conv.weight"], base.reshape(2, 3))
  np.testing.assert_array_equal(sd["conv.weight_t"], base.reshape(2, 3).T)
  assert sd["conv.weight_t"].flags.c_contiguous
  np.testing.assert_array_equal(sd["tail"], base[4:6])
  assert sd["half"].dtype == np.float16
  np.testing.assert_array_equal(sd["half"], [0.5, -2.0, 65504.0])
  assert sd["bn.num_batches_tracked"].shape == () and sd["bn.num_batches_tracked"] == 7


def test_loads_fabricated_state_dict(tmp_path):
  path = tmp_path / "model.pt"
  _write_zip(path, _fabricated_state(_PickleAsm()).getvalue(), _STORAGES)
  _check_fabricated(torch_checkpoint.load_torch_state_dict(path))


@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_loads_state_dict_nested_in_training_checkpoint(tmp_path, key):
  asm = _PickleAsm().op(pickle.EMPTY_DICT).op(pickle.MARK)
  asm.text("epoch").integer(3)
  asm.text(key)
  _fabricated_state(asm)
  asm.op(pickle.SETITEMS)
  path = tmp_path / "ckpt.pth"
  _write_zip(path, asm.getvalue(), _STORAGES, prefix="ckpt")
  _check_fabricated(torch_checkpoint.load_torch_state_dict(path))


class _Evil:

  def __init__(self, func, arg):
    self.func, self.arg = func, arg

  def __reduce__(self):
    return (self.func, (self.arg,))


@pytest.mark.parametrize("func,refused", [(os.system, "system"), (eval, "eval")])
def test_refuses_disallowed_globals_without_running_them(tmp_path, func, refused):
  marker = tmp_path / "pwned"
  payload = (f"touch {marker}" if func is os.system else
             f"open({str(marker)!r}, 'w').close()")
  data = pickle.dumps({"w": _Evil(func, payload)}, protocol=2)
  path = tmp_path / "evil.pt"
  _write_zip(path, data, {})
  with pytest.raises(errors.ModelError) as e:
    torch_checkpoint.load_torch_state_dict(path)
  msg = str(e.value)
  assert "\n" not in msg and str(path) in msg and refused in msg
  assert not marker.exists()


def test_refuses_unlisted_torch_global(tmp_path):
  asm = _PickleAsm().glob("torch", "load").text("x").op(pickle.TUPLE1).op(pickle.REDUCE)
  path = tmp_path / "evil.pt"
  _write_zip(path, asm.getvalue(), {})
  with pytest.raises(errors.ModelError, match="torch.load"):
    torch_checkpoint.load_torch_state_dict(path)


def test_storage_overrun_is_an_error(tmp_path):
  asm = _PickleAsm().ordered_dict().op(pickle.MARK)
  asm.text("w").tensor("FloatStorage", "0", 6, 4, (3,), (1,)).op(pickle.SETITEMS)
  path = tmp_path / "bad.pt"
  _write_zip(path, asm.getvalue(), {"0": _STORAGES["0"]})
  with pytest.raises(errors.ModelError, match="overruns"):
    torch_checkpoint.load_torch_state_dict(path)


def test_missing_and_non_zip_files(tmp_path):
  with pytest.raises(errors.ModelError, match="no such"):
    torch_checkpoint.load_torch_state_dict(tmp_path / "absent.pt")
  legacy = tmp_path / "legacy.pt"
  legacy.write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(errors.ModelError, match="not a zip"):
    torch_checkpoint.load_torch_state_dict(legacy)
