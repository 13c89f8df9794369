"""Process hygiene and error handling for the binaries.

TFF's local C++ execution context starts a `worker_binary` subprocess and reaches it
over gRPC on localhost; it has been seen to outlive the Python process.
`child_processes_reaped()` ends every child process of this one on normal exit, on
an exception, on SIGINT and on SIGTERM. `run_job` is every binary's shared error and
interrupt handling: a user mistake is one `error:` line, on a line of its own.
`import_tensorflow_quietly` drops the three lines of CUDA-plugin noise TensorFlow
2.14 prints at import on every machine.
"""

import contextlib
import faulthandler
import os
import re
import signal
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterator, Optional

from absl import app
from absl import flags
from absl import logging as absl_logging
import psutil

from tff_sam import errors


# TF 2.14 registers its CUDA plugins twice and logs each as an error at import (also on
# CPU-only machines); harmless (tensorflow/tensorflow#62075).
TF_IMPORT_NOISE = re.compile(r"Unable to register cu(DNN|FFT|BLAS) factory")


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow with its known import-time noise lines removed from stderr.

  Everything else TensorFlow writes to stderr meanwhile is passed on unchanged.
  """
  if "tensorflow" in sys.modules:
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import  # lazy: the point
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors="replace").splitlines(keepends=True):
        if not TF_IMPORT_NOISE.search(line):
          sys.stderr.write(line)
      sys.stderr.flush()


_LOCAL_WORKER_MODULE = "tff_sam.federated.backends.local_worker"
# What asks a binary for its usage (absl prints it for these, then exits 1).
HELP_ARGS = ("--help", "-h", "-?", "--helpshort")


def parse_flags(argv: list[str], *, usage: Optional[Callable[[], str]] = None) -> list[str]:
  """absl's flag parsing (`app.run`'s `flags_parser`), with `--help` exiting 0 and a
  flag mistake absl finds (unknown flag, bad value, missing flag file) one `error:` line.

  Args:
    argv: The command line.
    usage: Returns the text `--help` prints; default absl's usage of the main module's
      flags.

  Raises:
    SystemExit: 0 after `--help`; 1 on a flag mistake.
  """
  if any(a in HELP_ARGS for a in argv[1:]):
    try:
      if usage is None:
        app.usage(shorthelp=True, writeto_stdout=True)
      else:
        print(usage())
    except BrokenPipeError:  # `--help | head`
      pass
    raise SystemExit(0)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # An unknown flag, a bad value, a missing --flagfile.
    message = " ".join(str(e).split()).removeprefix("ERROR:: ")
    print(f"error: {message} (--help lists the flags)", file=sys.stderr)
    raise SystemExit(1) from None


def begin_binary(argv: list[str], *, warnings_only: bool = True) -> None:
  """The common start of a binary's `main`, after absl parsed its flags.

  Refuses stray positional arguments with one `error:` line (exit 1), shows only
  warnings and errors of absl's log (unless `warnings_only` is False, e.g. the user
  passed `-v`) and makes SIGUSR1 print every thread's Python stack to stderr
  (`kill -USR1 PID` on a run that seems stuck; the run goes on). TensorFlow is not
  loaded yet: `run_job` loads it after the flags are checked.

  Raises:
    SystemExit: 1, `argv` holds more than the program name.
  """
  if len(argv) > 1:
    print(f"error: unexpected arguments: {' '.join(argv[1:])} (flags are written "
          "--name=value; --help lists them)", file=sys.stderr)
    raise SystemExit(1)
  if warnings_only:
    absl_logging.set_verbosity(absl_logging.WARNING)
  if hasattr(signal, "SIGUSR1") and sys.__stderr__ is not None:
    with contextlib.suppress(AttributeError, OSError, ValueError):  # stderr without a file
      faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)


def _end_progress_bars() -> None:
  """Closes open tqdm bars and ends their line, so what follows starts a fresh line."""
  tqdm_class = getattr(sys.modules.get("tqdm"), "tqdm", None)
  bars = list(getattr(tqdm_class, "_instances", None) or ())
  cleared = False
  for bar in bars:
    cleared |= not getattr(bar, "leave", True)  # Closing clears it but ends no line.
    with contextlib.suppress(Exception):
      bar.close()
  if cleared:
    sys.stderr.write("\n")
    sys.stderr.flush()


def terminate_children(timeout: float = 5.0) -> int:
  """Terminates (then kills) all descendant processes; returns how many there were."""
  children = psutil.Process(os.getpid()).children(recursive=True)
  for child in children:
    with contextlib.suppress(psutil.Error):
      child.terminate()
  _, alive = psutil.wait_procs(children, timeout=timeout)
  for child in alive:
    with contextlib.suppress(psutil.Error):
      child.kill()
  psutil.wait_procs(alive, timeout=timeout)
  return len(children)


def stop_process(process: subprocess.Popen, *, timeout: float = 5.0) -> bool:
  """SIGTERM, then SIGKILL after `timeout` seconds; returns whether it was running."""
  if process.poll() is not None:
    return False
  process.terminate()
  try:
    process.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    process.wait()
  return True


def _raise_keyboard_interrupt(signum, frame):
  del frame
  raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def child_processes_reaped() -> Iterator[None]:
  """Runs the body with SIGTERM turned into KeyboardInterrupt; reaps children after."""
  previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
    terminate_children()


def end_local_workers_if_loaded() -> None:
  """Ends this process's local TFF workers if TFF's execution was loaded: the clean-up
  of the binaries that run TFF (`tff_sam.federated.backends.local_worker`, looked up,
  not imported: a binary that stopped at its flags never loaded TensorFlow)."""
  module = sys.modules.get(_LOCAL_WORKER_MODULE)
  if module is not None:
    module.end_local_workers()


def run_job(job: Callable[..., object], *, settings: Optional[Callable[[], Any]] = None,
            cleanup: Optional[Callable[[], object]] = None, tensorflow: bool = True) -> int:
  """Runs a binary's work with its children reaped; returns the exit code.

  `settings` (optional) reads and validates the flags and returns them; it runs first,
  before TensorFlow is imported, so a flag mistake is answered at once (TensorFlow
  takes seconds to load), and `job` then gets its result as its one argument (without
  `settings`, `job` takes none). With `tensorflow`, TensorFlow is imported next
  (`import_tensorflow_quietly`). `job` does the work (including installing TFF's
  execution context, `tff_sam.federated.backends.execution`).

  A `errors.UserError` is printed as one `error:` line (exit 1); Ctrl-C and SIGTERM
  print `interrupted` (exit 130); success is 0. `cleanup` runs after the job however
  it ended, before the children are reaped (binaries that run TFF pass
  `end_local_workers_if_loaded`).
  """
  try:
    args = () if settings is None else (settings(),)
    if tensorflow:
      import_tensorflow_quietly()
    with child_processes_reaped():
      try:
        job(*args)
      finally:
        if cleanup is not None:
          cleanup()
  except errors.UserError as e:
    _end_progress_bars()
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    _end_progress_bars()
    print("interrupted", file=sys.stderr)
    return 130
  return 0
