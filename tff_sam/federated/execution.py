"""Where TFF runs the program's computations, and the watch on its C++ worker.

`configure_tff_execution` installs TFF's local C++ execution context: a
`worker_binary` subprocess reached over gRPC on localhost, CPU only (it is built
without CUDA). `WorkerWatch` (used through `worker_watched`) turns a worker killed
mid-computation (e.g. out of memory), which TFF would restart and retry forever,
into an error.
"""

import atexit
import contextlib
import gc
import os
import signal
import subprocess
import threading
from typing import Iterator, MutableMapping

import psutil
import tensorflow_federated as tff

from tff_sam import errors
from tff_sam import runtime

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
  """
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


def configure_tff_execution(*, max_concurrent_computation_calls: int = -1,
                            num_subrounds: int = 1) -> None:
  """Installs TFF's local C++ execution context (CPU-only worker).

  The contexts are TFF's (`create_sync_local_cpp_execution_context` and its async
  and mergeable variants) with one change: `compile_for_cpp_worker` skips TFF's
  static Grappler pass.

  Args:
    max_concurrent_computation_calls: TFF's limit on concurrent calls in the C++
      runtime (-1 = none).
    num_subrounds: Above 1, TFF's mergeable-computation context: every computation
      is compiled to `MergeableCompForm`, its clients are split into this many groups
      run one after another on the same worker, and each group's partial aggregate
      is merged into the running one as it finishes. The round's memory then grows
      with the clients of one group instead of all of them; results equal the
      one-shot round's up to float summation order.
  """
  if num_subrounds > 1:
    tff.backends.native.set_mergeable_comp_execution_context(
        [_cpp_context(False, max_concurrent_computation_calls)], num_subrounds=num_subrounds)
  else:
    tff.framework.set_default_context(_cpp_context(True, max_concurrent_computation_calls))
  if not _ATEXIT_REGISTERED:
    atexit.register(end_workers)
    _ATEXIT_REGISTERED.append(True)


_ATEXIT_REGISTERED: list[bool] = []


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
  forever. This watch samples the direct children every `interval` seconds; when a
  worker it saw disappears it records the pid and sends this process SIGINT, so the
  blocked round raises `KeyboardInterrupt`; `check()` turns that into an error.

  A worker ended by SIGINT, SIGTERM or SIGHUP was stopped by the user (Ctrl-C in a
  terminal reaches the whole process group) and is left to the ordinary interrupt
  handling. The signal is read with `waitid(WNOWAIT)`, which leaves the child for
  TFF to reap; if TFF reaped it first the death counts as a crash.
  """

  USER_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

  def __init__(self, interval: float = 0.5):
    self.interval = interval
    self.dead: list[int] = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="tff-worker-watch", daemon=True)

  def __enter__(self) -> "WorkerWatch":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join(timeout=5)

  def _workers(self) -> set[int]:
    out = set()
    for p in psutil.Process().children(recursive=False):
      try:
        if p.name() == WORKER_BINARY and p.status() != psutil.STATUS_ZOMBIE:
          out.add(p.pid)
      except psutil.Error:
        pass
    return out

  @classmethod
  def _stopped_by_user(cls, pid: int) -> bool:
    """Whether the (not yet reaped) child `pid` was ended by a user's signal."""
    try:
      info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # Already reaped by TFF: the signal is unknown.
      return False
    return (info is not None and info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
            and info.si_status in cls.USER_SIGNALS)

  def _run(self) -> None:
    seen = self._workers()
    while not self._stop.wait(self.interval):
      current = self._workers()
      crashed = sorted(pid for pid in seen - current if not self._stopped_by_user(pid))
      if crashed:
        self.dead.extend(crashed)
        os.kill(os.getpid(), signal.SIGINT)
        return
      seen = current

  def check(self, section: str) -> None:
    """Raises `errors.UserError` if a worker died (call when a round was interrupted)."""
    if self.dead:
      raise errors.UserError(
          f"TFF's {WORKER_BINARY} (pid {self.dead[0]}) died during {section}; it is "
          "usually the kernel's out-of-memory killer (see `dmesg`). Try a smaller "
          "--batch_size, fewer clients per round or --clients_per_subround (README, 'Many "
          "clients per round: memory')")


@contextlib.contextmanager
def worker_watched(progress: MutableMapping[str, str], *, interval: float = 0.5
                   ) -> Iterator[None]:
  """Runs the body under a `WorkerWatch`; a dead worker ends it with an error.

  Args:
    progress: `progress["section"]` names what the body is doing; the body updates
      it, and the error names the section the worker died in.
    interval: Seconds between looks at the children.

  Raises:
    errors.UserError: The worker died (instead of the `KeyboardInterrupt` the watch
      sent to stop TFF's retries). A real Ctrl-C still raises `KeyboardInterrupt`.
  """
  progress.setdefault("section", "setup")
  with WorkerWatch(interval=interval) as watch:
    try:
      yield
    except KeyboardInterrupt:
      watch.check(progress["section"])
      raise
