"""Where TFF runs the program's computations, and the watch on its C++ worker.

`configure_tff_execution` installs one of two executions (`--execution`):

* `cpp`: TFF's local C++ execution context, a `worker_binary` subprocess reached
  over gRPC on localhost, CPU only (it is built without CUDA);
* `tf`: `tf_execution.TensorFlowExecutionContext`, which runs the same computations
  from TFF's compiled forms with TensorFlow in this process, on its GPUs if any.

With `workers` (`--workers`), `cpp` runs on TFF workers on other machines instead:
TFF's mergeable-computation context over one remote context per worker
(`build_remote_context`, `federated.workers`), each round's clients split over them.

`tf` is the default everywhere (`config.RunConfig.execution`); `cpp` runs when asked
for by name and for `--workers`.
`WorkerWatch` (used through `worker_watched`) turns a worker killed mid-computation
(e.g. out of memory), which TFF would restart and retry forever, into an error.

No orphan workers: TFF starts its worker with a plain `subprocess.Popen`, so a
Python process that dies without running its clean-up (`kill -9`, the kernel's
out-of-memory killer, a scheduler's hard stop) would leave it running. Every worker
gets a guardian (`guard_workers`): a small process that SIGKILLs it as soon as its
parent is gone, however that parent died. A run also records its workers in its
output folder (`WorkerWatch(pid_file=...)`) and `end_orphaned_workers` ends the ones
a dead earlier run left behind (e.g. when its guardian was killed with it).
"""

import atexit
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
from typing import Any, Iterator, MutableMapping, Optional, Sequence

import psutil
import tensorflow_federated as tff

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam import fileio
from tff_sam import runtime
from tff_sam.federated.backends import remote_workers
from tff_sam.federated.backends import tf_execution

WORKER_BINARY = "worker_binary"  # TFF's C++ worker (a child of the Python process)


def compile_for_cpp_worker(comp: tff.framework.ConcreteComputation
                           ) -> tff.framework.ConcreteComputation:
  """TFF's compilation for its C++ worker, without its static Grappler pass.

  TFF's own `desugar_and_transform_to_native` runs Grappler (aggressive constant
  folding, arithmetic, loop, memory and function optimization) over every
  TensorFlow graph in Python before the first call of a computation, then disables
  Grappler for the worker. Measured here (BENCHMARKS.md): that pass is most of a
  computation's first call (tiny model 21.4 s -> 6.8 s without it; MobileSAM decoder
  67 s -> 32 s) and the rounds are no slower without it (19-22 s vs 17-21 s per
  MobileSAM round; identical losses). Everything else is TFF's pipeline unchanged.

  TFF's runtime has no cryptographic secure-sum protocol: a computation using
  `federated_secure_sum*` (`--secure_aggregation`) first gets TFF's own simulation
  bodies for them (`tff.backends.test.replace_secure_intrinsics_with_bodies`, what
  TFF's test contexts run): the same bounded, quantized integer sums, with each
  client's value checked against the bound, summed in the clear.
  """
  comp = tf_execution.with_secure_sum_bodies(comp)
  desugared, _ = tff.tensorflow.replace_intrinsics_with_bodies(comp.to_building_block())
  return tff.backends.native.transform_to_native_form(
      tff.framework.ConcreteComputation(computation_proto=desugared.proto,
                                        context_stack=tff.framework.get_context_stack()),
      grappler_config=None)


def _cpp_context(sync: bool, max_concurrent_computation_calls: int):
  factory = tff.framework.local_cpp_executor_factory(
      max_concurrent_computation_calls=max_concurrent_computation_calls)
  context = tff.framework.SyncExecutionContext if sync else tff.framework.AsyncExecutionContext
  return context(executor_fn=factory, compiler_fn=compile_for_cpp_worker,
                 transform_args=tff.tensorflow.transform_args,
                 transform_result=tff.tensorflow.transform_result)


def describe_execution(name: str) -> str:
  """One line saying where the rounds of execution `name` run."""
  if name == config_lib.TF_EXECUTION:
    gpus = tf_execution.visible_gpus()
    where = (f"on {len(gpus)} GPU(s): {', '.join(gpus)}" if gpus
             else "on the CPU (TensorFlow sees no GPU)")
    return f"execution: tf (TFF's compiled rounds run by TensorFlow in this process {where})"
  return "execution: cpp (TFF's C++ worker_binary, CPU only)"


def build_context(execution: str, *, max_concurrent_computation_calls: int = -1):
  """A fresh synchronous TFF context of `execution` (not installed).

  For `cpp` its worker starts on first use (and gets a guardian, `guard_workers`);
  for `tf` the clients' work is spread over every visible GPU when there are several.
  """
  if execution == config_lib.TF_EXECUTION:
    gpus = tf_execution.visible_gpus()
    return tf_execution.TensorFlowExecutionContext(devices=gpus if len(gpus) > 1 else ())
  if execution != config_lib.CPP_EXECUTION:
    raise ValueError(f"unknown execution {execution!r}")
  guard_workers()
  return _cpp_context(True, max_concurrent_computation_calls)


def release_computations() -> None:
  """Closes what the installed `tf` context compiled (graphs, sessions); no-op otherwise.

  A computation called afterwards is compiled afresh. The program calls it when a run
  ends, so one process running many (`compare`'s arms, the tests) does not grow.
  """
  context = tff.framework.get_context_stack().current
  if isinstance(context, tf_execution.TensorFlowExecutionContext):
    context.close()


def build_remote_context(workers: Sequence[str], *,
                         timeout: float = remote_workers.DEFAULT_TIMEOUT_S,
                         num_subrounds: int = 1):
  """TFF's mergeable-computation context over running remote workers (not installed).

  Each worker gets one TFF `AsyncExecutionContext` over a `RemoteExecutor`
  (`workers.build_remote_contexts`); each computation is compiled to
  `MergeableCompForm` and its clients are split into `max(num_subrounds,
  len(workers))` sub-rounds, run on the workers in parallel and merged. Every worker
  is first checked with a tiny computation.

  Args:
    workers: `host:port` of each worker (`python -m tff_sam.experiments.worker`).
    timeout: Seconds a worker may stay unreachable before a computation raises
      `workers.WorkerLost` (TFF alone would retry forever).
    num_subrounds: At least this many sub-rounds (`--clients_per_subround`).

  Raises:
    errors.ConfigError: A worker does not answer the check, or answers it with an
      error (`--workers`, naming the worker).
  """
  return mergeable_over(remote_workers.build_remote_contexts(
      workers, timeout=timeout, compiler_fn=compile_for_cpp_worker),
                        timeout=timeout, num_subrounds=num_subrounds)


def mergeable_over(contexts: Sequence[remote_workers.WorkerContext], *,
                   timeout: float = remote_workers.DEFAULT_TIMEOUT_S, num_subrounds: int = 1):
  """`build_remote_context` from already built worker contexts (the benchmark's).

  Raises:
    errors.ConfigError: A worker does not answer the check (`build_remote_context`).
  """
  try:
    remote_workers.check_workers(contexts, timeout=timeout)
  except remote_workers.WorkerLost as e:
    raise errors.ConfigError("workers", f"worker {e.address} does not answer: start it there "
                             "(python -m tff_sam.experiments.worker --port PORT) and check "
                             "that this machine can reach that host and port") from None
  except remote_workers.WorkerFailed as e:
    raise errors.ConfigError("workers", f"{e} (is it a TFF worker of the same version?)"
                             ) from None
  return build_mergeable_context(contexts, num_subrounds=max(num_subrounds, len(contexts)))


def compile_to_mergeable(comp: tff.framework.ConcreteComputation
                         ) -> tff.framework.MergeableCompForm:
  """TFF's mergeable-form compiler, after TFF's simulation bodies for secure sums.

  `tff.backends.native.compile_to_mergeable_comp_form` refuses `federated_secure_sum*`
  (it cannot split them into a before-merge and a merge step); TFF's simulation
  bodies (`compile_for_cpp_worker`) turn them into bounded integer sums it can split.
  Computations without secure sums are compiled as TFF compiles them.
  """
  return tff.backends.native.compile_to_mergeable_comp_form(
      tf_execution.with_secure_sum_bodies(comp))


def build_mergeable_context(contexts: Sequence[Any], *, num_subrounds: int
                            ) -> tff.framework.MergeableCompExecutionContext:
  """TFF's mergeable-computation context over `contexts`, compiling with `compile_to_mergeable`.

  As `tff.backends.native.create_mergeable_comp_execution_context` builds it, but
  with that compiler (secure sums allowed).
  """
  return tff.framework.MergeableCompExecutionContext(
      async_contexts=list(contexts), compiler_fn=compile_to_mergeable,
      num_subrounds=num_subrounds)


def build_subround_context(*, num_subrounds: int, max_concurrent_computation_calls: int = -1
                           ) -> tff.framework.MergeableCompExecutionContext:
  """`--clients_per_subround` on one local C++ worker (`configure_tff_execution`)."""
  return build_mergeable_context([_cpp_context(False, max_concurrent_computation_calls)],
                                 num_subrounds=num_subrounds)


def configure_tff_execution(*, execution: str = config_lib.TF_EXECUTION,
                            max_concurrent_computation_calls: int = -1,
                            num_subrounds: int = 1, workers: Sequence[str] = (),
                            worker_timeout: float = remote_workers.DEFAULT_TIMEOUT_S) -> None:
  """Installs the TFF execution context `execution` (`cpp` or `tf`).

  `cpp`: TFF's contexts (`create_sync_local_cpp_execution_context` and its async
  and mergeable variants) with one change: `compile_for_cpp_worker` skips TFF's
  static Grappler pass. `tf`: `tf_execution.TensorFlowExecutionContext`, its
  clients' work spread over every visible GPU when there are several.

  Args:
    execution: `cpp` or `tf` (`config.EXECUTIONS`).
    max_concurrent_computation_calls: TFF's limit on concurrent calls in the C++
      runtime (-1 = none); `cpp` only.
    num_subrounds: `cpp` only: above 1, TFF's mergeable-computation context: every
      computation is compiled to `MergeableCompForm`, its clients are split into
      this many groups run one after another on the same worker, and each group's
      partial aggregate is merged into the running one as it finishes. The round's
      memory then grows with the clients of one group instead of all of them;
      results equal the one-shot round's up to float summation order. Under `tf`
      clients are accumulated one at a time anyway, so it has no effect.
    workers: `host:port` of running TFF workers, `cpp` only:
      `build_remote_context` (the round's clients spread over them).
    worker_timeout: Seconds a worker may stay unreachable (`build_remote_context`).

  Raises:
    errors.ConfigError: A worker does not answer (`build_remote_context`).
  """
  if workers:
    if execution != config_lib.CPP_EXECUTION:
      raise ValueError("workers run TFF's C++ worker: execution must be cpp")
    tff.framework.set_default_context(build_remote_context(
        workers, timeout=worker_timeout, num_subrounds=num_subrounds))
    return
  if execution == config_lib.CPP_EXECUTION and num_subrounds > 1:
    tff.framework.set_default_context(build_subround_context(
        num_subrounds=num_subrounds,
        max_concurrent_computation_calls=max_concurrent_computation_calls))
  else:
    tff.framework.set_default_context(build_context(
        execution, max_concurrent_computation_calls=max_concurrent_computation_calls))
  if execution == config_lib.TF_EXECUTION:
    return
  if not _ATEXIT_REGISTERED:
    atexit.register(end_workers)
    _ATEXIT_REGISTERED.append(True)
  guard_workers()


_ATEXIT_REGISTERED: list[bool] = []

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
  """`worker_binary` children of `process`: the running ones (pid -> create time) and
  the pids of those that have ended and are not yet reaped."""
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


class _WorkerGuard:
  """Gives every TFF worker this process starts its own guardian process."""

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


_GUARD: list[_WorkerGuard] = []


def guard_workers() -> None:
  """Starts (once per process) the thread that gives each TFF worker a guardian.

  Within half a second of a worker's start a guardian process watches it; when
  this process dies, however it dies, the guardian SIGKILLs the worker.
  """
  if not _GUARD:
    _GUARD.append(_WorkerGuard())


def end_orphaned_workers(pid_file: Path) -> list[int]:
  """Ends the TFF workers a dead earlier run recorded in `pid_file`.

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
  """TFF's `ServiceManager` objects (each owns one local `worker_binary`)."""
  return [o for o in gc.get_objects()
          if type(o).__name__ == "ServiceManager"
          and type(o).__module__.endswith("executor_stacks.executor_factory")]


def end_workers(timeout: float = 5.0) -> int:
  """Ends the workers of TFF's local contexts now and disarms their finalizers.

  TFF's `ServiceManager.__del__` sends its worker SIGINT and waits for it. Run while
  the interpreter shuts down it fails (its `subprocess` module is already torn down)
  and prints a traceback; run when a context is replaced mid-session it has been
  seen to wait forever. This ends each worker itself (SIGTERM, then SIGKILL after
  `timeout` seconds) and makes those finalizers no-ops. Registered with `atexit` by
  `configure_tff_execution`; any context used afterwards starts a fresh worker.

  Returns:
    How many running workers were ended.
  """
  ended = 0
  for manager in _service_managers():
    type(manager).__del__ = lambda self: None
    process = getattr(manager, "_process", None)
    if isinstance(process, subprocess.Popen):
      ended += runtime.stop_process(process, timeout=timeout)
      manager._process = None  # pylint: disable=protected-access
      manager._stub = None  # pylint: disable=protected-access
  return ended


class WorkerWatch:
  """Turns the death of this process's TFF worker into an error instead of a hang.

  When the kernel kills TFF's `worker_binary` (out of memory), TFF's execution
  context starts a new one and retries the computation, which dies the same way,
  forever; when a worker ends at start-up, TFF waits for it to answer, forever. This
  watch samples the direct children every `interval` seconds; when a worker it saw
  disappears, or a worker it never saw alive has ended (an unreaped child), it records
  the pid and how it ended and sends this process SIGINT, so the blocked call raises
  `KeyboardInterrupt`; `check()` turns that into an error.

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

  def __enter__(self) -> "WorkerWatch":
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
    """The running workers (recorded in `pid_file`) and the ended, unreaped ones."""
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
      ended = (seen - current) | (ended_now - earlier)
      crashed = sorted(pid for pid in ended if not self._stopped_by_user(pid))
      if crashed:
        self.dead.extend((pid, self._how_ended(pid)) for pid in crashed)
        os.kill(os.getpid(), signal.SIGINT)
        return
      seen = current

  def check(self, section: str) -> None:
    """Raises `errors.UserError` if a worker died (call when a round was interrupted)."""
    if not self.dead:
      return
    pid, how = self.dead[0]
    if how.startswith("exit code"):
      cause = "it stopped by itself: its own messages above say why"
    else:
      cause = ("it is usually the kernel's out-of-memory killer (see `dmesg`). Try a smaller "
               "--batch_size, fewer clients per round or --clients_per_subround (README, "
               "'Many clients per round: memory')")
    raise errors.UserError(f"TFF's {WORKER_BINARY} (pid {pid}{', ' + how if how else ''}) "
                           f"died during {section}; {cause}")


@contextlib.contextmanager
def worker_watched(progress: MutableMapping[str, str], *, interval: float = 0.5,
                   pid_file: Optional[Path] = None) -> Iterator[None]:
  """Runs the body under a `WorkerWatch`; a dead worker ends it with an error.

  Args:
    progress: `progress["section"]` names what the body is doing; the body updates
      it, and the error names the section the worker died in.
    interval: Seconds between looks at the children.
    pid_file: Where the running workers are recorded (for `end_orphaned_workers`).

  Raises:
    errors.UserError: The worker died (instead of the `KeyboardInterrupt` the watch
      sent to stop TFF's retries). A real Ctrl-C still raises `KeyboardInterrupt`.
  """
  progress.setdefault("section", "setup")
  with WorkerWatch(interval=interval, pid_file=pid_file) as watch:
    try:
      yield
    except KeyboardInterrupt:
      watch.check(progress["section"])
      raise
