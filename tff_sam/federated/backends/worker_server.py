"""TFF's C++ `worker_binary` as a server on a port, and how to reach one.

The server side of `--workers` (`python -m tff_sam.experiments.worker`). This module
imports neither TensorFlow nor TFF, so a worker starts in well under a second; the
client side, TFF's contexts over these servers, is `tff_sam.federated.backends.remote_workers`.

`worker_binary` (TFF 0.87's only execution engine, statically linked, CPU only)
listens on `[::]:PORT` with no TLS and no authentication, and has no flag to bind one
address; it logs nothing.
"""

import contextlib
import ctypes
import importlib.util
from pathlib import Path
import signal
import socket
import subprocess
import time

from tff_sam import config as config_lib

def worker_binary_path() -> Path:
  """TFF's C++ `worker_binary` in the installed wheel (found without importing TFF)."""
  spec = importlib.util.find_spec("tensorflow_federated")
  if spec is None or spec.origin is None:
    raise FileNotFoundError("tensorflow_federated is not installed")
  path = Path(spec.origin).parent / "data" / "worker_binary"
  if not path.is_file():
    raise FileNotFoundError(f"TFF's worker_binary is missing at {path}")
  return path


def reachable(address: str, *, timeout: float = 1.0) -> bool:
  """Whether a TCP connection to `address` (host:port) opens within `timeout` s."""
  host, port = config_lib.split_address(address)
  try:
    with socket.create_connection((host, port), timeout=timeout):
      return True
  except OSError:
    return False


def _die_with_parent() -> None:  # pragma: no cover (runs in the child)
  """In the worker's process before exec: SIGKILL it when its parent dies (Linux)."""
  with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def start_worker(*, port: int, max_concurrent_computation_calls: int = -1,
                 grpc_max_message_length_megabytes: int = 10000,
                 wait_s: float = 30.0) -> subprocess.Popen:
  """Starts TFF's `worker_binary` serving on `port` and waits until it listens.

  The worker dies with the thread that started it (`PR_SET_PDEATHSIG`; call this
  from the main thread to tie it to the process), however that ends. It listens on every interface (`[::]:port`), without TLS or
  authentication; it has no flag to bind one address.

  Args:
    port: TCP port to listen on.
    max_concurrent_computation_calls: TFF's limit on concurrent calls (-1 = none).
    grpc_max_message_length_megabytes: Largest gRPC message it accepts.
    wait_s: How long to wait for it to listen.

  Returns:
    The worker's process.

  Raises:
    OSError: The port is taken, or the worker did not start listening in time.
  """
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    # As gRPC's server binds: a port whose old connections linger (TIME_WAIT) is free.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      raise OSError(f"port {port} is in use ({e.strerror})") from None
  process = subprocess.Popen(  # pylint: disable=consider-using-with
      [str(worker_binary_path()), f"--port={port}",
       f"--max_concurrent_computation_calls={max_concurrent_computation_calls}",
       f"--grpc_max_message_length_megabytes={grpc_max_message_length_megabytes}"],
      stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
  deadline = time.monotonic() + wait_s
  while not reachable(f"localhost:{port}", timeout=0.5):
    if process.poll() is not None:
      raise OSError(f"worker_binary exited with code {process.returncode} before listening "
                    f"on port {port}")
    if time.monotonic() > deadline:
      process.kill()
      raise OSError(f"worker_binary did not listen on port {port} within {wait_s:g} s")
    time.sleep(0.1)
  return process


