"""The local worker and the binaries' process hygiene: a killed local worker is an
error, not an endless retry; every backend failure is one line naming its section; no
local worker outlives its run; error lines on their own line; no TF noise.

The local worker here is a real child process named like TFF's (`sleep` under the name
`worker_binary`); `test_resume.py` kills the real local worker of a running binary.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from tqdm import tqdm

from tff_sam import errors
from tff_sam import runtime
from tff_sam.federated.backends import failures
from tff_sam.federated.backends import local_worker
from tff_sam.federated.backends import remote_workers
from tff_sam.federated.backends import tf_execution

from conftest import cpp_execution


@pytest.fixture(autouse=True)
def _no_reaping(monkeypatch):
  """`run_job` ends every child of this process when it returns: in the test process
  that would also end the session's TFF worker, which later tests need."""
  monkeypatch.setattr(runtime, "terminate_children", lambda **_: 0)


@pytest.fixture
def fake_worker(tmp_path):
  path = tmp_path / local_worker.WORKER_BINARY
  os.symlink("/bin/sleep", path)
  procs = []

  def start():
    proc = subprocess.Popen([str(path), "60"])
    procs.append(proc)
    time.sleep(0.5)  # Long enough for the watch to see it.
    return proc

  yield start
  for proc in procs:
    proc.kill()
    proc.wait()


def _wait_for_interrupt(seconds: float) -> None:
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    time.sleep(0.05)


def test_killed_worker_is_an_error_naming_the_section(fake_worker):
  progress = {"section": "setup"}
  with pytest.raises(errors.UserError, match=r"worker_binary \(pid \d+, SIGKILL\) died during round 3;"
                     r" .*out-of-memory"):
    with failures.user_errors(progress, interval=0.05):
      worker = fake_worker()
      progress["section"] = "round 3"
      worker.send_signal(signal.SIGKILL)  # What the kernel's OOM killer sends.
      _wait_for_interrupt(10)
      pytest.fail("the watch did not interrupt the body")


@pytest.fixture
def failing_worker(tmp_path):
  """Starts a child named like TFF's worker that exits at once with code 1 (unreaped)."""
  path = tmp_path / "failing" / local_worker.WORKER_BINARY
  path.parent.mkdir()
  os.symlink("/bin/false", path)
  procs = []

  def start():
    procs.append(subprocess.Popen([str(path)]))
    return procs[-1]

  yield start
  for proc in procs:
    proc.wait()


def test_worker_that_ends_before_it_is_seen_is_an_error(failing_worker):
  """TFF would wait forever for a worker that failed at start-up to answer."""
  progress = {"section": "setup"}
  with pytest.raises(errors.UserError, match=r"worker_binary \(pid \d+, exit code 1\) died "
                     r"during setup; it stopped by itself: its own messages above say why"):
    with failures.user_errors(progress, interval=0.5):
      failing_worker()  # Ends long before the watch's first look.
      _wait_for_interrupt(10)
      pytest.fail("the watch did not interrupt the body")


def test_worker_ended_before_the_watch_began_is_not_reported(failing_worker):
  failing_worker()
  time.sleep(0.3)  # Ended, not reaped.
  with failures.user_errors({}, interval=0.05):
    _wait_for_interrupt(1.0)  # No interrupt arrives: the body ends normally.


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_worker_stopped_by_user_signal_is_not_reported(fake_worker, sig):
  progress = {}
  with failures.user_errors(progress, interval=0.05):
    worker = fake_worker()
    worker.send_signal(sig)  # Ctrl-C in a terminal reaches the worker too.
    _wait_for_interrupt(1.0)  # No interrupt arrives: the body ends normally.
  assert progress == {"section": "setup"}


def test_real_interrupt_passes_through(fake_worker):
  with pytest.raises(KeyboardInterrupt):
    with failures.user_errors({}, interval=0.05):
      fake_worker()
      raise KeyboardInterrupt


def test_run_job_prints_one_error_line_for_a_dead_worker(fake_worker, capsys):
  def job():
    with failures.user_errors({"section": "round 1"}, interval=0.05):
      fake_worker().send_signal(signal.SIGKILL)
      _wait_for_interrupt(10)

  assert runtime.run_job(job) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: TFF's worker_binary"), err


_RESUMES = "then run the same command again: it resumes from the last saved round"


@pytest.mark.parametrize("error, resumable, message", [
    (remote_workers.WorkerLost("h:1", 10.0), True,
     "worker h:1 stopped answering (no answer for 10 s, --worker_timeout) during round 2; "
     "restart it there (python -m tff_sam.experiments.worker --port PORT) or remove it from "
     f"--workers, {_RESUMES}"),
    (remote_workers.WorkerLost("h:1", 10.0), False,
     "worker h:1 stopped answering (no answer for 10 s, --worker_timeout) during round 2"),
    (remote_workers.WorkerFailed("h:1", "no such file"), True,
     "worker h:1 failed: no such file (during round 2); the README's 'Several machines' says "
     "what a worker machine needs"),
    (remote_workers.WorkerFailed("h:1", "no such file"), False,
     "worker h:1 failed: no such file during round 2"),
    (tf_execution.OutOfDeviceMemory("OOM"), True,
     "out of device memory during round 2 (--execution=tf: OOM); lower --batch_size or "
     f"--prompts_per_image (or use --embedding_cache in online mode), {_RESUMES}"),
    (tf_execution.OutOfDeviceMemory("OOM"), False,
     "out of device memory during round 2 (--execution=tf: OOM)"),
    (local_worker.LocalWorkerDied(7, "exit code 1"), False,
     "TFF's worker_binary (pid 7, exit code 1) died during round 2; it stopped by itself: its "
     "own messages above say why"),
    (local_worker.LocalWorkerDied(7, ""), True,
     "TFF's worker_binary (pid 7) died during round 2; it is usually the kernel's "
     "out-of-memory killer (see `dmesg`). Try a smaller --batch_size, fewer clients per round "
     "or --clients_per_subround (docs/execution.md, 'Many clients per round: memory')"),
])
def test_backend_failures_become_one_line_naming_the_section(error, resumable, message):
  progress = {}
  with pytest.raises(errors.UserError) as info:
    with failures.user_errors(progress, resumable=resumable, interval=0.05):
      progress["section"] = "round 2"
      raise error
  assert str(info.value) == message


# ------------------------------------------------------------------- orphan workers


def _worker_record(path, parent_pid, parent_time, worker, worker_time=None):
  if worker_time is None:
    worker_time = psutil.Process(worker.pid).create_time()
  path.write_text(json.dumps({
      "parent": {"pid": parent_pid, "create_time": parent_time},
      "workers": [{"pid": worker.pid, "create_time": worker_time}]}))


def test_workers_of_a_dead_run_are_ended(fake_worker, tmp_path):
  worker = fake_worker()
  gone = subprocess.Popen(["true"])
  gone.wait()
  record = tmp_path / "workers.json"
  _worker_record(record, gone.pid, 1.0, worker)  # Its run is dead.
  assert local_worker.end_orphaned_local_workers(record) == [worker.pid]
  assert worker.wait(timeout=5) == -signal.SIGKILL
  # A live run's workers (this process is alive) are left alone.
  worker = fake_worker()
  me = psutil.Process()
  _worker_record(record, me.pid, me.create_time(), worker)
  assert local_worker.end_orphaned_local_workers(record) == []
  assert worker.poll() is None
  # A recycled pid (another start time) is not the recorded worker.
  _worker_record(record, gone.pid, 1.0, worker, worker_time=12.5)
  assert local_worker.end_orphaned_local_workers(record) == []
  assert worker.poll() is None
  # No record, or an unreadable one: nothing to do.
  assert local_worker.end_orphaned_local_workers(tmp_path / "none.json") == []
  (tmp_path / "bad.json").write_text("{")
  assert local_worker.end_orphaned_local_workers(tmp_path / "bad.json") == []


_KILLED_PARENT = """
import os, subprocess, sys, time
from tff_sam.federated.backends import local_worker
local_worker.guard_local_workers()
worker = subprocess.Popen([sys.argv[1], "120"])
deadline = time.time() + 60
while worker.pid not in local_worker._GUARD[0].guarded:
  assert time.time() < deadline
  time.sleep(0.05)
print(worker.pid, flush=True)
os.kill(os.getpid(), 9)
"""


def test_worker_ends_when_its_python_process_is_killed(tmp_path):
  """A real kill -9 of the process that started the worker: it ends within seconds."""
  binary = tmp_path / local_worker.WORKER_BINARY
  os.symlink("/bin/sleep", binary)
  proc = subprocess.run([sys.executable, "-c", _KILLED_PARENT, str(binary)],
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  worker = psutil.Process(int(proc.stdout.split()[0]))
  try:
    worker.wait(timeout=5)
  except psutil.TimeoutExpired:
    worker.kill()
    pytest.fail("the worker outlived its killed parent by 5 s")
  except psutil.NoSuchProcess:
    pass


def test_error_after_a_progress_bar_starts_its_own_line(capsys):

  def job():
    bar = tqdm(total=10, desc="encoding", file=sys.stderr, leave=False)
    bar.update(3)
    raise errors.DataError("a.png", "cannot read file")

  assert runtime.run_job(job) == 1
  err = capsys.readouterr().err
  assert "\nerror: a.png: cannot read file\n" in err, repr(err)


def test_tensorflow_import_noise_is_dropped():
  code = ("import os, sys; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'\n"
          "from tff_sam import runtime; runtime.import_tensorflow_quietly()\n"
          "print('after', file=sys.stderr)\n")
  quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False)
  assert quiet.returncode == 0, quiet.stderr[-2000:]
  assert quiet.stderr.strip() == "after", quiet.stderr
  loud = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True,
                        text=True, timeout=300, check=False,
                        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  # The filter is exact: TF still prints these lines without it (else drop the filter).
  assert runtime.TF_IMPORT_NOISE.search(loud.stderr), loud.stderr


def test_sigusr1_prints_every_threads_stack_and_the_binary_goes_on():
  """`kill -USR1 PID` on a run that seems stuck shows where it is (`begin_binary`)."""
  code = ("import os, signal, threading, time\n"
          "from tff_sam import runtime\n"
          "runtime.begin_binary(['binary'])\n"
          "release = threading.Event()\n"
          "def other_thread_waits():\n"
          "  release.wait()\n"
          "other = threading.Thread(target=other_thread_waits)\n"
          "other.start()\n"
          "def where_it_waits():\n"
          "  os.kill(os.getpid(), signal.SIGUSR1)\n"
          "  time.sleep(0.5)\n"
          "where_it_waits()\n"
          "release.set()\n"
          "other.join()\n"
          "print('went on')\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "went on"
  assert "in where_it_waits" in proc.stderr, proc.stderr[-2000:]
  assert "in other_thread_waits" in proc.stderr, proc.stderr[-2000:]


def test_local_worker_ended_on_purpose_is_not_a_crash():
  """`end_local_workers` under the watch (the benchmark ends its side executions' local
  workers mid-run): no error, no interrupt."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  @tff.tensorflow.computation(np.int32)
  def add_one(x):
    return x + 1

  with failures.user_errors({"section": "setup"}, interval=0.05):
    with cpp_execution():
      assert add_one(1) == 2  # A real local worker_binary runs it.
      assert local_worker.end_local_workers() == 1
      _wait_for_interrupt(1.0)  # The watch looks 20 times.


def test_progress_bars_are_drawn_only_on_a_terminal(monkeypatch):
  """In a log file or a pipe a bar's carriage returns would mix with the log lines."""
  from tff_sam import terminal  # pylint: disable=import-outside-toplevel

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  monkeypatch.setattr(sys, "stderr", io.StringIO())
  assert terminal.progress_bar(range(3)).disable
  monkeypatch.setattr(sys, "stderr", Terminal())
  assert not terminal.progress_bar(range(3)).disable
  assert terminal.progress_bar(range(3), disable=True).disable
