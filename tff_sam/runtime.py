"""Process hygiene and error handling for the binaries.

TFF's local C++ execution context starts a `worker_binary` subprocess and reaches it
over gRPC on localhost; it has been seen to outlive the Python process.
`child_processes_reaped()` ends every child process of this one on normal exit, on
an exception, on SIGINT and on SIGTERM. `run_job` is every binary's shared error and
interrupt handling: a user mistake is one `error:` line.
"""

import contextlib
import os
import signal
import subprocess
import sys
from typing import Callable, Iterator, Optional

import psutil

from tff_sam import errors


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


def run_job(job: Callable[[], object], *,
            cleanup: Optional[Callable[[], object]] = None) -> int:
  """Runs a binary's work with its children reaped; returns the exit code.

  `job` builds its validated config and does the work (including installing TFF's
  execution context, `tff_sam.federated.execution`). A `errors.UserError` is printed
  as one `error:` line (exit 1); Ctrl-C and SIGTERM print `interrupted` (exit 130);
  success is 0. `cleanup` runs after the job however it ended, before the children
  are reaped (binaries that load TFF pass `execution.end_workers`).
  """
  try:
    with child_processes_reaped():
      try:
        job()
      finally:
        if cleanup is not None:
          cleanup()
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  return 0
