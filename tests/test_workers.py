"""`--workers`: a round's clients over several TFF workers (`python -m tff_sam.experiments.worker`).

Every worker these tests start listens only inside a network namespace the test
makes (`conftest.Namespace`: `worker_binary` binds every interface and has no flag to
bind one), and is ended by its pid. The run binaries that use them run in the same
namespace. Real
`worker_binary` servers, real runs of `python -m tff_sam.experiments.run`, a real
`kill -9`, and a worker whose filesystem lacks the run's files (a mount namespace
with an empty folder over the cache).
"""

import csv
import json
from pathlib import Path
import re
import socket
import subprocess
import sys
import threading
import time

from concurrent import futures

import grpc
import h5py
import numpy as np
import psutil
import pytest
from tensorflow_federated.proto.v0 import executor_pb2

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam.federated.backends import execution
from tff_sam.federated.backends import remote_workers
from tff_sam.federated.backends import worker_server

from conftest import CROSS_RUNTIME_RTOL
from conftest import Worker
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]

def _cli(out: Path, settings: dict, *extra: str) -> list[str]:
  return [sys.executable, "-m", "tff_sam.experiments.run", f"--output_dir={out}",
          *[f"--{k}={v}" for k, v in settings.items()], *extra]


def _rows(out: Path) -> list[dict[str, str]]:
  with open(out / "metrics.csv") as f:
    return list(csv.DictReader(f))


def _assert_rows_equal(got: list[dict], want: list[dict], tol: float) -> None:
  assert [r["round"] for r in got] == [r["round"] for r in want]
  for g, w in zip(got, want):
    for key, value in w.items():
      if key != "seconds" and value:
        assert float(g[key]) == pytest.approx(float(value), rel=tol, abs=tol), (g["round"], key)


def _model_weights(model_dir: Path) -> dict[str, np.ndarray]:
  """Every weight of an exported model's `tf_model.h5`, by its path in the file.

  The Keras model's own name is numbered by how many were built in that process
  (`tf_sam_model_3`); transformers' loader ignores it, and so does this.
  """
  out = {}
  with h5py.File(model_dir / "tf_model.h5", "r") as f:
    f.visititems(lambda name, item: out.__setitem__(
        re.sub(r"/tf_sam_model(_\d+)?/", "/tf_sam_model/", name), item[()])
                 if isinstance(item, h5py.Dataset) else None)
  assert len(out) > 100
  return out


# ---------------------------------------------------------------- config and the binary


@pytest.mark.parametrize("workers, timeout, message", [
    (("nonsense",), 120.0, "--workers: 'nonsense' is not host:port"),
    (("host:0",), 120.0, "--workers: 'host:0' is not host:port"),
    (("a:1", "a:1"), 120.0, "--workers: lists a:1 more than once"),
    (("a:1",), 1.0, "--worker_timeout: must be >= 2 seconds"),
])
def test_bad_workers_settings_name_the_flag(workers, timeout, message):
  config = config_lib.RunConfig(output_dir="x", workers=workers, worker_timeout=timeout)
  with pytest.raises(errors.ConfigError, match=message):
    config.validate()


def test_workers_with_tf_execution_is_refused_and_auto_means_cpp(run_binary):
  result = run_binary("run", "--workers=localhost:1", "--execution=tf", "--output_dir=x")
  assert result.code == 1
  assert result.error_lines() == [
      "error: --workers: runs the rounds on TFF's C++ workers; it cannot be combined with "
      "--execution=tf (drop one)"]
  assert config_lib.RunConfig.from_dict(
      {"output_dir": "x", "workers": ["a:1", "b:2"]}).workers == ("a:1", "b:2")


def test_worker_command_errors_are_one_line():
  with socket.socket() as taken:
    taken.bind(("", 0))
    taken.listen()
    port = taken.getsockname()[1]
    for args, message in (([], "error: --port: must be set"),
                          ([f"--port={port}"], f"error: --port: port {port} is in use"),
                          (["--port=70000"], "error: --port: must be in 1..65535")):
      result = subprocess.run([sys.executable, "-m", "tff_sam.experiments.worker", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
      assert result.returncode == 1
      lines = result.stderr.strip().splitlines()
      assert len(lines) == 1 and lines[0].startswith(message), result.stderr


def test_worker_command_prints_its_address_and_dies_with_its_parent(namespace, tmp_path):
  worker = Worker(namespace, tmp_path / "w.log")
  assert worker.lines[0].startswith(f"warning: port {worker.port} accepts connections from "
                                    "anyone"), worker.lines
  assert f":{worker.port}: pass --workers=" in worker.lines[1]
  assert worker_server.reachable(f"localhost:{worker.port}") is False  # Not on this host.
  worker.end()
  assert worker.process.returncode == 130  # `interrupted`
  # kill -9 of the wrapper: the kernel ends its worker_binary (PR_SET_PDEATHSIG).
  second = Worker(namespace, tmp_path / "w2.log")
  second.process.kill()
  second.process.wait(timeout=30)
  _, alive = psutil.wait_procs([second.binary], timeout=10)
  assert not alive, "worker_binary outlived its kill -9'd worker command"


# ---------------------------------------------------------------- the client side


def test_a_port_that_is_not_a_tff_worker_fails_the_check():
  """A listener that accepts and never answers: one ConfigError naming it, in time."""
  with socket.socket() as silent:
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    start = time.monotonic()
    with pytest.raises(errors.ConfigError, match=f"--workers: .*worker {address}"):
      execution.build_remote_context([address], timeout=4)
    assert time.monotonic() - start < 30


def test_a_worker_gone_silent_mid_call_ends_the_call_within_the_timeout(monkeypatch):
  """A machine that vanishes without closing its connection: the call in flight would
  wait forever; once the probe has failed for the timeout the channel is closed and
  the call raises `WorkerLost`.

  A real gRPC server on 127.0.0.1 whose GetExecutor never returns stands for the
  worker; after a second the probe's connections fail (as to a vanished machine)
  while the server keeps the established connection open.
  """
  release = threading.Event()

  def never_returns(request, context):
    del request, context
    release.wait(60)
    return executor_pb2.GetExecutorResponse()

  server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
  server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
      "tensorflow_federated.v0.ExecutorGroup", {"GetExecutor": grpc.unary_unary_rpc_method_handler(
          never_returns, request_deserializer=executor_pb2.GetExecutorRequest.FromString,
          response_serializer=executor_pb2.GetExecutorResponse.SerializeToString)})])
  port = server.add_insecure_port("127.0.0.1:0")
  server.start()
  vanished = threading.Event()
  real_reachable = worker_server.reachable
  monkeypatch.setattr(worker_server, "reachable",
                      lambda address, **kw: not vanished.is_set() and real_reachable(address, **kw))
  try:
    address = f"127.0.0.1:{port}"
    start = time.monotonic()  # Before the stub: its probe's first answer is after this.
    stub = remote_workers._WatchedStub(address, timeout=3)  # pylint: disable=protected-access
    threading.Timer(1.0, vanished.set).start()
    with pytest.raises(remote_workers.WorkerLost, match=f"worker {address} stopped answering"):
      stub.get_executor(executor_pb2.GetExecutorRequest())
    took = time.monotonic() - start
    # Lost once `timeout` s have passed since its last answer (so within `timeout` of
    # vanishing at 1 s), not while it answered.
    assert 1 + 3 - 2 * remote_workers.PROBE_INTERVAL_S <= took < 1 + 3 + 0.5, took
    with pytest.raises(remote_workers.WorkerLost):  # And every later call, at once.
      stub.compute(executor_pb2.ComputeRequest())
  finally:
    release.set()
    server.stop(0)


def test_first_line_drops_tensorflow_node_suffix():
  message = ("/data/x.tfrecord; No such file or directory\n\t [[{{node ReadFile}}]]\n"
             "\t [[more]]")
  assert remote_workers._first_line(message) == "/data/x.tfrecord; No such file or directory"  # pylint: disable=protected-access
  assert remote_workers._first_line("a [[{{node b}}]]") == "a"  # pylint: disable=protected-access


# ---------------------------------------------------------------- whole runs


@pytest.mark.slow
def test_unreachable_worker_is_one_line_before_encoding(tmp_path, reference_settings):
  port = free_port()
  result = subprocess.run(
      _cli(tmp_path / "out", reference_settings, f"--workers=127.0.0.1:{port}",
           "--worker_timeout=5"), cwd=REPO, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 1, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: --workers: worker 127.0.0.1:{port} does not answer: start it there (python -m "
      "tff_sam.experiments.worker --port PORT) and check that this machine can reach that "
      "host and port")
  assert "Traceback" not in result.stderr
  assert "embeddings:" not in result.stdout  # Checked before any encoding.


@pytest.mark.slow
def test_two_workers_equal_the_local_worker(namespace, tmp_path, reference_run,
                                            reference_settings):
  """4 rounds on 2 workers: every metric of every round and the exported weights to
  `CROSS_RUNTIME_RTOL` against the same run on the local C++ worker, and every metric to
  that bound against the session's reference run under tf (with Adam the weights of the
  two runtimes drift apart up to 6.7e-5, measured). Workers and the local worker are the
  same binary but do not sum in the same order: 2 sub-rounds' partial sums are merged,
  where the local worker sums the 4 clients at once; CI measured weights 1.84e-6 apart."""
  first, second = Worker(namespace, tmp_path / "w1.log"), Worker(namespace, tmp_path / "w2.log")
  out = tmp_path / "two"
  result = namespace.run(_cli(out, reference_settings,
                              f"--workers={first.address},{second.address}"), timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines()[0] == (
      f"execution: cpp on 2 remote worker(s) {first.address}, {second.address}: each round's "
      "clients in 2 sub-round(s) spread over them (TFF's mergeable execution)")
  _assert_rows_equal(_rows(out), _rows(reference_run.out), CROSS_RUNTIME_RTOL)  # cpp vs tf.
  local = tmp_path / "local"
  done = namespace.run(_cli(local, reference_settings, "--execution=cpp"), timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  _assert_rows_equal(_rows(out), _rows(local), CROSS_RUNTIME_RTOL)
  got, want = _model_weights(out / "model"), _model_weights(local / "model")
  assert got.keys() == want.keys()
  assert max(float(np.max(np.abs(got[k] - want[k]))) for k in want) <= CROSS_RUNTIME_RTOL
  # Both workers computed: each spent CPU time on the rounds.
  for worker in (first, second):
    assert sum(worker.binary.cpu_times()[:2]) > 1.0
  saved = json.loads((out / "config.json").read_text())
  assert saved["workers"] == [first.address, second.address]
  first.end()
  second.end()


@pytest.mark.slow
def test_killed_worker_ends_the_round_then_the_same_command_resumes(namespace, tmp_path,
                                                                     reference_run,
                                                                     reference_settings):
  """kill -9 of one of 2 workers in round 2: one error line within --worker_timeout;
  the same command with that worker removed resumes and equals the uninterrupted run."""
  settings = {**reference_settings, "rounds": 2}
  first, second = Worker(namespace, tmp_path / "w1.log"), Worker(namespace, tmp_path / "w2.log")
  out = tmp_path / "killed"
  args = _cli(out, settings, f"--workers={first.address},{second.address}",
              "--worker_timeout=10")
  run = namespace.popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not (out / "state" / "round_1").exists():
    assert run.poll() is None, run.stderr.read()[-2000:]
    assert time.time() < deadline
    time.sleep(0.2)
  second.binary.kill()  # kill -9 of the worker_binary itself.
  killed = time.monotonic()
  run.wait(timeout=120)
  took = time.monotonic() - killed
  stderr = run.stderr.read()
  assert run.returncode == 1, stderr[-2000:]
  assert "Traceback" not in stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: worker {second.address} stopped answering (no answer for "
                         "10 s, --worker_timeout) during round 2; restart it there"), last
  assert took < 10 + 5, took  # Within the timeout (plus the round's own second or two).
  assert not (out / "summary.json").exists()

  again = namespace.run(_cli(out, settings, f"--workers={first.address}",
                             "--worker_timeout=10"), timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming" in again.stdout and "after round 1/2" in again.stdout
  ref_rows = [r for r in _rows(reference_run.out) if int(r["round"]) <= 2]
  _assert_rows_equal(_rows(out), ref_rows, CROSS_RUNTIME_RTOL)  # cpp vs tf.
  first.end()
  second.process.wait(timeout=30)  # Its worker_binary died: the command ends with an error.
  assert second.process.returncode == 1


@pytest.mark.slow
def test_worker_without_the_files_names_worker_and_file(namespace, tmp_path, reference_settings):
  """A worker machine without the run's cache: the round ends naming worker and file."""
  cache_dir = Path(reference_settings["cache_dir"])
  blind = Worker(namespace, tmp_path / "w.log", mount_over=cache_dir)
  result = namespace.run(_cli(tmp_path / "out", {**reference_settings, "rounds": 1},
                              f"--workers={blind.address}"), timeout=900)
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: worker {blind.address} failed: "), last
  assert str(cache_dir) in last and "No such file or directory" in last, last
  assert "(during round 0 (zero-shot evaluation)); the README's 'Several machines'" in last, last
  assert "Traceback" not in result.stderr
  blind.end()
