r"""A TFF worker for `run --workers`: TFF's C++ worker_binary serving on a port.

  python -m tff_sam.experiments.worker --port 8000

Prints the address to give to `run --workers=HOST:PORT` and serves until Ctrl-C or
SIGTERM, which end the worker with it (it also dies if this process is killed). The
port accepts any connection, unencrypted and unauthenticated: run workers on a
private network or behind an SSH tunnel (README, "Several machines"). The worker
reads each client's files at the paths the run's manifests name, so it needs the
run's output folder and cache at the same paths (a shared filesystem).
"""

import os
import socket
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # The worker's TensorFlow: errors only.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from tff_sam import errors
from tff_sam import runtime

flags.DEFINE_integer("port", None, "TCP port to listen on (all interfaces).")
flags.DEFINE_integer("max_concurrent_computation_calls", -1,
                     "TFF's limit on concurrent computation calls in the worker (-1 = none).")
flags.DEFINE_integer("grpc_max_message_length_megabytes", 10000,
                     "Largest gRPC message the worker accepts, in MB.")

FLAGS = flags.FLAGS


def main(argv):
  runtime.begin_binary(argv)
  # lazy: keeps `--help` fast; this binary never imports TensorFlow.
  from tff_sam.federated.backends import worker_server  # pylint: disable=g-import-not-at-top

  def job():
    port = FLAGS.port
    errors.require(port is not None, "port", "must be set (e.g. --port=8000)")
    errors.require(1 <= port <= 65535, "port", f"must be in 1..65535, got {port}")
    errors.require(FLAGS.max_concurrent_computation_calls == -1
                   or FLAGS.max_concurrent_computation_calls >= 1,
                   "max_concurrent_computation_calls",
                   f"must be -1 (no limit) or >= 1, got {FLAGS.max_concurrent_computation_calls}")
    errors.require(FLAGS.grpc_max_message_length_megabytes >= 1,
                   "grpc_max_message_length_megabytes",
                   f"must be >= 1, got {FLAGS.grpc_max_message_length_megabytes}")
    try:
      process = worker_server.start_worker(
          port=port, max_concurrent_computation_calls=FLAGS.max_concurrent_computation_calls,
          grpc_max_message_length_megabytes=FLAGS.grpc_max_message_length_megabytes)
    except OSError as e:
      raise errors.ConfigError("port", str(e)) from None
    print(f"warning: port {port} accepts connections from anyone who can reach it, without "
          "TLS or authentication: run workers on a private network or behind an SSH tunnel "
          "(README, 'Several machines')", file=sys.stderr, flush=True)
    print(f"TFF worker (pid {process.pid}) listening on {socket.gethostname()}:{port}: pass "
          f"--workers={socket.gethostname()}:{port} to run (or localhost:{port} on this "
          "machine); Ctrl-C ends it", flush=True)
    try:
      code = process.wait()
    finally:
      runtime.stop_process(process)
    raise errors.UserError(f"TFF's worker_binary (pid {process.pid}) exited with code {code}"
                           + (" (killed by a signal; the kernel's out-of-memory killer? see "
                              "`dmesg`)" if code < 0 else ""))

  return runtime.run_job(job, tensorflow=False)


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
