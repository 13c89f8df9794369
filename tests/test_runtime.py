"""`execution.worker_watched`: a killed TFF worker becomes an error, not an endless retry.

The worker here is a real child process named like TFF's (`sleep` under the name
`worker_binary`); `test_resume.py` kills the real worker of a running binary.
"""

import os
import signal
import subprocess
import time

import pytest

from tff_sam import errors
from tff_sam.federated import execution
from tff_sam import runtime


@pytest.fixture
def fake_worker(tmp_path):
  path = tmp_path / execution.WORKER_BINARY
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
  with pytest.raises(errors.UserError, match=r"worker_binary \(pid \d+\) died during round 3;"
                     r" .*out-of-memory"):
    with execution.worker_watched(progress, interval=0.05):
      worker = fake_worker()
      progress["section"] = "round 3"
      worker.send_signal(signal.SIGKILL)  # What the kernel's OOM killer sends.
      _wait_for_interrupt(10)
      pytest.fail("the watch did not interrupt the body")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_worker_stopped_by_user_signal_is_not_reported(fake_worker, sig):
  progress = {}
  with execution.worker_watched(progress, interval=0.05):
    worker = fake_worker()
    worker.send_signal(sig)  # Ctrl-C in a terminal reaches the worker too.
    _wait_for_interrupt(1.0)  # No interrupt arrives: the body ends normally.
  assert progress == {"section": "setup"}


def test_real_interrupt_passes_through(fake_worker):
  with pytest.raises(KeyboardInterrupt):
    with execution.worker_watched({}, interval=0.05):
      fake_worker()
      raise KeyboardInterrupt


def test_run_job_prints_one_error_line_for_a_dead_worker(fake_worker, capsys):
  def job():
    with execution.worker_watched({"section": "round 1"}, interval=0.05):
      fake_worker().send_signal(signal.SIGKILL)
      _wait_for_interrupt(10)

  assert runtime.run_job(job) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: TFF's worker_binary"), err
