"""Process hygiene for the binaries: TFF's C++ worker must not outlive a run.

TFF's local C++ execution context starts a `worker_binary` subprocess and reaches it
over gRPC on localhost. It runs on CPU only (it is built without CUDA) and has been
seen to outlive the Python process. `child_processes_reaped()` ends every child
process of this one on normal exit, on an exception, on SIGINT and on SIGTERM.
"""

import contextlib
import os
import signal
import sys
from typing import Callable, Iterator


def terminate_children(timeout: float = 5.0) -> int:
  """Terminates (then kills) all descendant processes; returns how many there were."""
  import psutil  # pylint: disable=g-import-not-at-top

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


def configure_tff_execution(*, max_concurrent_computation_calls: int = -1) -> None:
  """Installs TFF's local C++ execution context (CPU-only worker)."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  tff.backends.native.set_sync_local_cpp_execution_context(
      max_concurrent_computation_calls=max_concurrent_computation_calls)


def run_job(job: Callable[[], object]) -> int:
  """Runs a binary's work with its children reaped; returns the exit code.

  `job` builds its validated config and does the work (including
  `configure_tff_execution`). A `errors.UserError` is printed as one `error:` line
  (exit 1); Ctrl-C and SIGTERM print `interrupted` (exit 130); success is 0.
  """
  from tff_sam import errors  # pylint: disable=g-import-not-at-top

  try:
    with child_processes_reaped():
      job()
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  return 0
