"""Atomic file and directory writes.

A crash (even `kill -9`) must never leave a partial file that a later run trusts.
Everything the project writes goes to a temporary sibling first and is moved into
place with `os.replace`, which is atomic on POSIX file systems.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, os.PathLike]


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_path(path: PathLike, *, suffix: str = "") -> Iterator[Path]:
  """Yields a temporary path beside `path`; moves it onto `path` on success.

  Args:
    path: The final file path.
    suffix: Suffix of the temporary file (some writers infer the format from it).

  Yields:
    A temporary path in the same directory. On an exception it is removed.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
  os.close(fd)
  tmp_path = Path(tmp)
  try:
    yield tmp_path
    with open(tmp_path, "rb") as f:
      os.fsync(f.fileno())
    os.chmod(tmp_path, 0o666 & ~_umask())
    os.replace(tmp_path, path)
  finally:
    if tmp_path.exists():
      tmp_path.unlink()


def write_bytes(path: PathLike, data: bytes) -> None:
  """Atomically writes `data` to `path`."""
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)


def write_text(path: PathLike, text: str) -> None:
  """Atomically writes `text` (UTF-8) to `path`."""
  write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any) -> None:
  """Atomically writes `obj` as indented JSON to `path`."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
  """Yields a temporary directory beside `path`; swaps it into place on success.

  An existing directory at `path` is replaced only after the new one is complete.

  Args:
    path: The final directory path.

  Yields:
    A fresh temporary directory. On an exception it is removed.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
  try:
    yield tmp
    os.chmod(tmp, 0o777 & ~_umask())
    old = None
    if path.exists():
      old = path.parent / f".{path.name}.old.{os.getpid()}"
      os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def default_cache_dir() -> Path:
  """The project's cache root: `$TFF_SAM_CACHE`, else `~/.cache/tff_sam`."""
  env = os.environ.get("TFF_SAM_CACHE")
  return Path(env).expanduser() if env else Path.home() / ".cache" / "tff_sam"


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
  """Returns the hex SHA-256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(chunk_size), b""):
      digest.update(chunk)
  return digest.hexdigest()
