"""An output folder a command owns: created, checked writable, and locked.

Two commands writing one folder (a scheduler's retry, two terminals) corrupt each
other's results, so every command that writes a folder of results (`run` and each
`compare` arm, `compare`'s own folder, `bench`) first `claim`s it:

* the folder is created (with its parents) if missing; a path that cannot be
  (a file in the way, a read-only file system, no permission) is one `UserError`
  naming it, and a folder made for a claim that failed is removed again;
* an exclusive `flock` on `LOCK_FILE` inside it is held until the command ends.
  The kernel releases it when the process dies, even by `kill -9`, so there is
  never a stale lock to remove by hand. A second command on a folder in use is one
  `UserError` naming the folder and the process holding it;
* the lock file holds that process's pid and command line (what the second
  command reports). Writing it also proves the folder writable, with space left.

`writing_errors` turns the errors of writing results later on (no space left, the
disk turned read-only), Python's or TensorFlow's, into one `UserError` naming the
file or folder.
"""

import contextlib
import errno
import fcntl
import os
import sys
from pathlib import Path
from typing import Iterator, Union

import psutil

from tff_sam import errors

LOCK_FILE = ".tff_sam.lock"
# The `OSError`s of writing that a user fixes (space, quota, permissions, mounts).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _create(folder: Path) -> list[Path]:
  """Creates `folder` and missing parents; returns the folders made, deepest first."""
  made = []
  for path in (folder, *folder.parents):
    if path.exists():
      break
    made.append(path)
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except FileExistsError:  # `exist_ok` covers folders only: a file is in the way.
    raise errors.DataError(folder, "is a file, not a folder; choose another output "
                           "folder") from None
  except OSError as e:
    raise errors.DataError(folder, f"cannot be created ({e.strerror})") from None
  return made


def _command() -> str:
  """This process's command line after the interpreter (e.g. `-m tff_sam.experiments.run
  --output_dir=...`)."""
  try:
    words = psutil.Process().cmdline()[1:]
  except psutil.Error:
    words = sys.argv
  return " ".join(" ".join(words).split())  # One line (`python -c` code has several).


def _holder(lock: Path) -> str:
  try:
    text = " ".join(lock.read_text().split())
  except OSError:
    text = ""
  return (text[:300] + " ...") if len(text) > 300 else (text or "pid unknown")


def _lock(folder: Path) -> int:
  """Opens and locks `folder`'s lock file; returns its descriptor."""
  lock = folder / LOCK_FILE
  existed = lock.exists()
  try:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  except OSError as e:
    raise errors.DataError(folder, f"cannot be written ({e.strerror})") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise errors.DataError(
        folder, f"is in use by another command ({_holder(lock)}); wait for it to end, or "
        "choose another output folder") from None
  try:
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}: {_command()}\n".encode())
    os.fsync(fd)
  except OSError as e:
    if not existed:  # Made by this claim, which holds it: no other command uses it.
      lock.unlink(missing_ok=True)
    os.close(fd)
    raise errors.DataError(folder, f"cannot be written ({e.strerror})") from None
  return fd


@contextlib.contextmanager
def claim(folder: Union[str, os.PathLike]) -> Iterator[Path]:
  """Creates `folder` if needed and holds its lock while the body runs (module docstring).

  Args:
    folder: The output folder (`~` is expanded).

  Yields:
    The folder, as a `Path`.

  Raises:
    errors.DataError: It cannot be created or written, or another command holds it.
  """
  folder = Path(folder).expanduser()
  made = _create(folder)
  try:
    fd = _lock(folder)
  except errors.UserError:
    for path in made:  # Leave nothing behind that a later command could take for a run.
      with contextlib.suppress(OSError):
        path.rmdir()
    raise
  try:
    yield folder
  finally:
    os.close(fd)  # Releases the lock; the file stays (removing it would race a waiter).


@contextlib.contextmanager
def writing_errors(folder: Union[str, os.PathLike]) -> Iterator[None]:
  """Turns a failed write in the body into one `UserError`: an `OSError` of
  `WRITE_ERRNOS` (naming its file), or TensorFlow's error for the same causes (its
  checkpoint writer reports a full disk as `ResourceExhaustedError`; naming `folder`).
  """
  try:
    yield
  except OSError as e:
    if e.errno not in WRITE_ERRNOS:
      raise
    raise _cannot_write(e.filename or folder, e.strerror) from None
  except Exception as e:  # pylint: disable=broad-except  # Only TensorFlow's, by cause.
    reason = next((r for r in _WRITE_REASONS if r in str(e)), None)
    if reason is None or not type(e).__module__.startswith("tensorflow"):
      raise
    raise _cannot_write(folder, reason) from None


_WRITE_REASONS = tuple(os.strerror(n) for n in WRITE_ERRNOS)  # "No space left on device", ...


def _cannot_write(path: object, reason: str) -> errors.DataError:
  return errors.DataError(path, f"cannot be written ({reason}); what was saved is kept: free "
                          "space or fix the folder, then run the same command again (a run "
                          "resumes from its last saved round)")
