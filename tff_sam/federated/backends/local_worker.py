"""The local worker's lifecycle: guarded, recorded, watched and ended.

A worker is a TFF worker server process: TFF's C++ `worker_binary` serving TFF's
executor over gRPC. Remote workers run on other machines (`--workers`,
`remote_workers`); the local worker is the one TFF's local C++ context
(`execution.build_context("cpp")`) starts as a child of this Python process with a
plain `subprocess.Popen` and reaches on localhost. This module looks after it:

* no orphans: a Python process that dies without running its clean-up (`kill -9`,
  the kernel's out-of-memory killer, a scheduler's hard stop) would leave its local
  worker running. Every local worker gets a guardian (`guard_local_workers`): a
  small process that SIGKILLs it as soon as its parent is gone, however that parent
  died. A run also records its local workers in its output folder
  (`local_worker_watched(pid_file=...)`) and `end_orphaned_local_workers` ends the
  ones a dead earlier run left behind (e.g. when its guardian was killed with it);
* no hangs: `LocalWorkerWatch` (used through `local_worker_watched`) turns a local
  worker killed mid-computation (e.g. out of memory), which TFF would restart and
  retry forever, into `LocalWorkerDied` (`failures.user_errors` makes it a user
  error);
* a clean exit: `end_local_workers` ends them itself instead of TFF's finalizers.
"""

import contextlib
import gc
import json
import logging
import os
from pathlib import Path
import signal
import subprocess
import sys
import threading
from typing import Any, Iterator, Optional

import psutil

from tff_sam import fileio
from tff_sam import runtime

WORKER_BINARY = "worker_binary"  # TFF's C++ worker (the local one is a child of this process)


class LocalWorkerDied(Exception):
  """The local worker died during a computation (not stopped by the user).

  Attributes:
    pid: The worker's process id.
    how: 'exit code N' or the signal's name; '' if unknown (TFF reaped it first).
  """

  def __init__(self, pid: int, how: str):
    super().__init__(f"TFF's {WORKER_BINARY} (pid {pid}{', ' + how if how else ''}) died")
    self.pid = pid
    self.how = how


# The guardian: exits when its worker has ended; SIGKILLs the worker (which does not
# reliably stop on SIGTERM) when the guardian's parent, the Python process that
# started both, is gone (it is then re-parented, so its parent pid changes).
_GUARDIAN = """
import os, sys, time
parent, worker = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    time.sleep(0.25)
    try:
        os.kill(worker, 0)
    except ProcessLookupError:
        sys.exit(0)
try:
    os.kill(worker, 9)
except ProcessLookupError:
    pass
"""


def _worker_children(process: psutil.Process) -> tuple[dict[int, float], set[int]]:
  """`worker_binary` children of `process` (its local workers): the running ones
  (pid -> create time) and the pids of those that have ended and are not yet reaped."""
  live, ended = {}, set()
  for child in process.children(recursive=False):
    with contextlib.suppress(psutil.Error):
      if child.name() != WORKER_BINARY:
        continue
      if child.status() == psutil.STATUS_ZOMBIE:
        ended.add(child.pid)
      else:
        live[child.pid] = child.create_time()
  return live, ended


class _LocalWorkerGuard:
  """Gives every local worker this process starts its own guardian process."""

  def __init__(self, interval: float = 0.5):
    self.interval = interval
    self.guarded: dict[int, subprocess.Popen] = {}
    self._thread = threading.Thread(target=self._run, name="tff-worker-guard", daemon=True)
    self._thread.start()

  def _run(self) -> None:
    me = psutil.Process()
    while True:
      with contextlib.suppress(psutil.Error, OSError):
        for pid in _worker_children(me)[0]:
          if pid not in self.guarded:
            self.guarded[pid] = subprocess.Popen(  # pylint: disable=consider-using-with
                [sys.executable, "-S", "-c", _GUARDIAN, str(os.getpid()), str(pid)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        for pid, guardian in list(self.guarded.items()):
          if guardian.poll() is not None:  # Its worker ended: reap the guardian.
            del self.guarded[pid]
      threading.Event().wait(self.interval)


_GUARD: list[_LocalWorkerGuard] = []


def guard_local_workers() -> None:
  """Starts (once per process) the thread that gives each local worker a guardian.

  Within half a second of a local worker's start a guardian process watches it;
  when this process dies, however it dies, the guardian SIGKILLs the worker.
  """
  if not _GUARD:
    _GUARD.append(_LocalWorkerGuard())


def end_orphaned_local_workers(pid_file: Path) -> list[int]:
  """Ends the local workers a dead earlier run recorded in `pid_file`.

  A worker is ended only if it is still the recorded process (same pid, name and
  start time) and the run that started it is gone; a live run's workers are left
  alone.

  Returns:
    The pids ended.
  """
  try:
    record = json.loads(Path(pid_file).read_text())
    parent = (int(record["parent"]["pid"]), float(record["parent"]["create_time"]))
    workers = [(int(w["pid"]), float(w["create_time"])) for w in record["workers"]]
  except (OSError, ValueError, KeyError, TypeError):
    return []
  with contextlib.suppress(psutil.Error):
    if abs(psutil.Process(parent[0]).create_time() - parent[1]) < 1e-3:
      return []  # That run is alive.
  ended = []
  for pid, create_time in workers:
    with contextlib.suppress(psutil.Error):
      process = psutil.Process(pid)
      if (process.name() == WORKER_BINARY and abs(process.create_time() - create_time) < 1e-3
          and process.status() != psutil.STATUS_ZOMBIE):
        process.kill()
        ended.append(pid)
  if ended:
    logging.getLogger("tff_sam").warning(
        "ended TFF %s pid(s) %s left running by a dead earlier run (%s)", WORKER_BINARY,
        ", ".join(map(str, ended)), pid_file)
  return ended


def _write_pid_file(pid_file: Path, workers: dict[int, float]) -> None:
  me = psutil.Process()
  fileio.write_json(pid_file, {
      "parent": {"pid": me.pid, "create_time": me.create_time()},
      "workers": [{"pid": p, "create_time": t} for p, t in sorted(workers.items())]})


def _service_managers() -> list:
  """TFF's `ServiceManager` objects (each owns one local worker)."""
  return [o for o in gc.get_objects()
          if type(o).__name__ == "ServiceManager"
          and type(o).__module__.endswith("executor_stacks.executor_factory")]


# Pids of local workers `end_local_workers` ended: `LocalWorkerWatch` ignores them.
_ENDED_ON_PURPOSE: set[int] = set()


def end_local_workers(timeout: float = 5.0) -> int:
  """Ends the local workers of TFF's local contexts now and disarms their finalizers.

  TFF's `ServiceManager.__del__` sends its worker SIGINT and waits for it. Run while
  the interpreter shuts down it fails (its `subprocess` module is already torn down)
  and prints a traceback; run when a context is replaced mid-session it has been
  seen to wait forever. This ends each worker itself (SIGTERM, then SIGKILL after
  `timeout` seconds) and makes those finalizers no-ops. Registered with `atexit` by
  `execution.configure_tff_execution`; any context used afterwards starts a fresh
  local worker.

  Returns:
    How many running local workers were ended.
  """
  ended = 0
  for manager in _service_managers():
    type(manager).__del__ = lambda self: None
    process = getattr(manager, "_process", None)
    if isinstance(process, subprocess.Popen):
      _ENDED_ON_PURPOSE.add(process.pid)  # Not a crash for a running watch.
      ended += runtime.stop_process(process, timeout=timeout)
      manager._process = None  # pylint: disable=protected-access
      manager._stub = None  # pylint: disable=protected-access
  return ended


class LocalWorkerWatch:
  """Turns the death of this process's local worker into an error instead of a hang.

  When the kernel kills the local worker (out of memory), TFF's execution context
  starts a new one and retries the computation, which dies the same way, forever;
  when a local worker ends at start-up, TFF waits for it to answer, forever. This
  watch samples the direct children every `interval` seconds; when a worker it saw
  disappears, or a worker it never saw alive has ended (an unreaped child), it records
  the pid and how it ended and sends this process SIGINT, so the blocked call raises
  `KeyboardInterrupt`; `check()` turns that into `LocalWorkerDied`.

  A worker ended by SIGINT, SIGTERM or SIGHUP was stopped by the user (Ctrl-C in a
  terminal reaches the whole process group) and is left to the ordinary interrupt
  handling. The signal is read with `waitid(WNOWAIT)`, which leaves the child for
  TFF to reap; if TFF reaped it first the death counts as a crash.
  """

  USER_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

  def __init__(self, interval: float = 0.5, pid_file: Optional[Path] = None):
    self.interval = interval
    self.pid_file = pid_file
    self.dead: list[tuple[int, str]] = []  # (pid, how it ended)
    self._recorded: dict[int, float] = {}
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def __enter__(self) -> "LocalWorkerWatch":
    # Taken before the body runs: workers ended before the watch began are not its
    # business, and one the body starts is new however soon it ends.
    seen, earlier = self._workers()
    self._thread = threading.Thread(target=self._run, args=(earlier, seen),
                                    name="tff-worker-watch", daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join(timeout=5)

  def _workers(self) -> tuple[set[int], set[int]]:
    """The running local workers (recorded in `pid_file`) and the ended, unreaped ones."""
    live, ended = _worker_children(psutil.Process())
    if self.pid_file is not None and live and live != self._recorded:
      with contextlib.suppress(OSError):
        _write_pid_file(self.pid_file, live)
        self._recorded = live
    return set(live), ended

  @staticmethod
  def _exit_status(pid: int) -> Optional[Any]:
    """`waitid`'s record of how the (not yet reaped) child `pid` ended, leaving it
    unreaped for TFF; None if it runs or was already reaped."""
    try:
      return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # Already reaped by TFF: how it ended is unknown.
      return None

  @classmethod
  def _stopped_by_user(cls, pid: int) -> bool:
    """Whether the (not yet reaped) child `pid` was ended by a user's signal."""
    info = cls._exit_status(pid)
    return (info is not None and info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
            and info.si_status in cls.USER_SIGNALS)

  @classmethod
  def _how_ended(cls, pid: int) -> str:
    """'exit code N' or the signal's name for the (not yet reaped) child `pid`; '' if unknown."""
    info = cls._exit_status(pid)
    if info is None:
      return ""
    if info.si_code == os.CLD_EXITED:
      return f"exit code {info.si_status}"
    with contextlib.suppress(ValueError):
      return signal.Signals(info.si_status).name
    return f"signal {info.si_status}"

  def _run(self, earlier: set[int], seen: set[int]) -> None:
    while not self._stop.wait(self.interval):
      current, ended_now = self._workers()
      # Also a worker that ended before any look saw it alive (a start-up failure):
      # TFF then waits for it to answer, forever.
      ended = ((seen - current) | (ended_now - earlier)) - _ENDED_ON_PURPOSE
      crashed = sorted(pid for pid in ended if not self._stopped_by_user(pid))
      if crashed:
        self.dead.extend((pid, self._how_ended(pid)) for pid in crashed)
        os.kill(os.getpid(), signal.SIGINT)
        return
      seen = current

  def check(self) -> None:
    """Raises `LocalWorkerDied` if a local worker died (call when the body was interrupted)."""
    if self.dead:
      raise LocalWorkerDied(*self.dead[0])


@contextlib.contextmanager
def local_worker_watched(*, interval: float = 0.5,
                         pid_file: Optional[Path] = None) -> Iterator[None]:
  """Runs the body under a `LocalWorkerWatch`; a dead local worker ends it with an error.

  Args:
    interval: Seconds between looks at the children.
    pid_file: Where the running local workers are recorded (for
      `end_orphaned_local_workers`).

  Raises:
    LocalWorkerDied: The local worker died (instead of the `KeyboardInterrupt` the
      watch sent to stop TFF's retries). A real Ctrl-C still raises
      `KeyboardInterrupt`.
  """
  with LocalWorkerWatch(interval=interval, pid_file=pid_file) as watch:
    try:
      yield
    except KeyboardInterrupt:
      watch.check()
      raise
