"""Clients over several machines: TFF's C++ workers as servers (`--workers`).

TFF 0.87's wheel ships one execution engine, the C++ `worker_binary`, which serves
TFF's executor over gRPC. `worker_server.start_worker` runs it as a long-lived
server on a port (the `worker` binary). `build_remote_contexts` reaches each server with TFF's own
`RemoteExecutor`, one `AsyncExecutionContext` per worker, and
`execution.configure_tff_execution(workers=...)` combines them with TFF's
mergeable-computation context: each round is compiled to `MergeableCompForm`, its
clients are split into sub-rounds spread over the workers, and the partial
aggregates are merged (TFF's machinery; nothing here re-implements a round).

Two things are added around TFF's classes, neither of which changes a result:

* `WorkerContext` gives each worker's context its own thread and event loop.
  TFF's remote executor makes blocking gRPC calls inside `async def`, so on one
  event loop the sub-rounds ran one after another; on their own loops they overlap.
* `_WatchedStub` and `_Probe` bound how long a lost worker can stall the run.
  TFF's `AsyncExecutionContext.invoke` retries an unavailable worker forever (with
  back-off up to 30 s), and a call to a machine that vanished without closing its
  connection never returns. A probe connects to each worker's port every second;
  once one has been unreachable for `timeout` seconds its channel is closed (which
  ends its calls in flight) and every call raises `WorkerLost`. A worker that comes
  back within the timeout (restarted on the same port) is used again: TFF's retry
  re-sends the sub-round. An error the worker itself reports (a file it cannot
  read) raises `WorkerFailed` with the worker's first line.

No TLS, no authentication: `worker_binary` accepts any connection on its port, so
workers belong on a private network or behind an SSH tunnel (README, "Several
machines").
"""

import asyncio
import contextlib
import re
import threading
import time
from typing import Any, Callable, Optional, Sequence

import grpc
import numpy as np
import tensorflow_federated as tff

from tensorflow_federated.python.common_libs import async_utils
from tensorflow_federated.python.core.impl.context_stack import context_base
from tensorflow_federated.python.core.impl.executors import executors_errors

from tff_sam import config as config_lib
from tff_sam.federated.backends import worker_server

DEFAULT_TIMEOUT_S = 120.0
PROBE_INTERVAL_S = 1.0
# TFF's local C++ context's channel options (2 GB messages: a round's state).
_GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
GRPC_OPTIONS = (("grpc.max_message_length", _GRPC_MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", _GRPC_MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", _GRPC_MAX_MESSAGE_BYTES))
# Retryable errors from a worker that still answers its port before it counts as failed
# (TFF retries FAILED_PRECONDITION as well as UNAVAILABLE, forever).
_MAX_RETRIES_WHILE_REACHABLE = 8


class WorkerLost(Exception):
  """A worker stopped answering for longer than the timeout."""

  def __init__(self, address: str, timeout: float):
    super().__init__(f"worker {address} stopped answering (no answer for {timeout:g} s, "
                     "--worker_timeout)")
    self.address = address


class WorkerFailed(Exception):
  """A worker reported an error computing its part (e.g. a file it cannot read)."""

  def __init__(self, address: str, message: str):
    super().__init__(f"worker {address} failed: {message}")
    self.address = address


# ---------------------------------------------------------------- the client side


class _Probe:
  """Connects to one worker's port every `interval` s; declares it lost after `timeout`.

  `lost` becomes true at the first failed probe `timeout - interval` seconds or more
  after the last one that connected, so at most `timeout` seconds after the worker
  went away; `on_lost` then runs once (it closes the worker's gRPC channel, ending
  its calls in flight).
  """

  def __init__(self, address: str, *, timeout: float, interval: float = PROBE_INTERVAL_S,
               on_lost: Callable[[], None] = lambda: None):
    self.address = address
    self.timeout = timeout
    self.interval = interval
    self.on_lost = on_lost
    self.last_ok = time.monotonic()
    self.lost = False
    self._changed = threading.Condition()
    self._thread = threading.Thread(target=self._run, name=f"tff-worker-probe-{address}",
                                    daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while not self.lost:
      ok = worker_server.reachable(self.address, timeout=min(self.interval, 2.0))
      with self._changed:
        now = time.monotonic()
        if ok:
          self.last_ok = now
        elif now - self.last_ok >= self.timeout - self.interval:
          self.lost = True
        self._changed.notify_all()
      if self.lost:
        with contextlib.suppress(Exception):
          self.on_lost()
        return
      time.sleep(self.interval)

  def wait_reachable(self) -> bool:
    """Blocks until the next probe answers (True) or the worker is lost (False)."""
    with self._changed:
      asked = time.monotonic()
      while not self.lost and self.last_ok < asked:
        self._changed.wait(self.interval)
      return not self.lost


class _WatchedStub(tff.framework.RemoteExecutorGrpcStub):
  """TFF's gRPC stub for one worker, whose calls end when the worker is lost."""

  def __init__(self, address: str, *, timeout: float):
    self.address = address
    self.timeout = timeout
    channel = grpc.insecure_channel(address, options=list(GRPC_OPTIONS))
    super().__init__(channel)
    self._retries = 0
    self.probe = _Probe(address, timeout=timeout, on_lost=channel.close)

  def _call(self, method: Callable[[Any], Any], request: Any) -> Any:
    if self.probe.lost:
      raise WorkerLost(self.address, self.timeout)
    try:
      response = method(request)
    except executors_errors.RetryableGRPCError as e:
      if not self.probe.wait_reachable():
        raise WorkerLost(self.address, self.timeout) from None
      self._retries += 1
      if self._retries > _MAX_RETRIES_WHILE_REACHABLE:
        raise WorkerFailed(self.address, _first_line(str(e))) from None
      raise  # TFF's context retries the sub-round (e.g. on a restarted worker).
    except grpc.RpcError as e:
      if self.probe.lost:
        raise WorkerLost(self.address, self.timeout) from None
      details = e.details() if isinstance(e, grpc.Call) else str(e)
      raise WorkerFailed(self.address, _first_line(details)) from None
    self._retries = 0
    return response

  def get_executor(self, request):
    return self._call(super().get_executor, request)

  def create_value(self, request):
    return self._call(super().create_value, request)

  def create_struct(self, request):
    return self._call(super().create_struct, request)

  def create_call(self, request):
    return self._call(super().create_call, request)

  def create_selection(self, request):
    return self._call(super().create_selection, request)

  def compute(self, request):
    return self._call(super().compute, request)

  def dispose(self, request):
    with contextlib.suppress(WorkerLost, WorkerFailed):  # Clean-up of a failed call.
      return self._call(super().dispose, request)

  def dispose_executor(self, request):
    with contextlib.suppress(WorkerLost, WorkerFailed):
      return self._call(super().dispose_executor, request)


def _first_line(message: str) -> str:
  """The informative first line of a TensorFlow error relayed by a worker."""
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  line = lines[0] if lines else "unknown error"
  return re.sub(r"\s*\[\[.*$", "", line)  # Drop TF's "[[{{node ...}}]]" suffix.


def _executor_factory(stub: _WatchedStub):
  """TFF's executor factory over one remote worker (as its local C++ factory builds)."""

  def stack_fn(cardinalities):
    cardinalities.setdefault(tff.CLIENTS, 0)  # As TFF's local factory (no clients yet).
    executor = tff.framework.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  return tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)


class WorkerContext(context_base.AsyncContext):
  """One worker's async TFF context, its invocations on their own thread's event loop.

  Attributes:
    context: TFF's `AsyncExecutionContext` over the worker's `RemoteExecutor`.
    address: The worker's `host:port`.
    busy: `(start, end)` (`time.monotonic`) of each finished invocation, for the
      benchmark's view of which workers computed at the same time; cleared by it.
  """

  def __init__(self, context: context_base.AsyncContext, address: str):
    self.context = context
    self.address = address
    self.busy: list[tuple[float, float]] = []
    self._runner = async_utils.AsyncThreadRunner()

  async def invoke(self, comp, arg):
    run = self._runner.run_coro_and_return_result  # Blocks: called off this event loop.
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def target():
      start = time.monotonic()
      try:
        result = run(self.context.invoke(comp, arg))
      except BaseException as e:  # pylint: disable=broad-except
        loop.call_soon_threadsafe(lambda e=e: done.done() or done.set_exception(e))
      else:
        self.busy.append((start, time.monotonic()))
        loop.call_soon_threadsafe(lambda: done.done() or done.set_result(result))

    threading.Thread(target=target, name=f"tff-subround-{self.address}", daemon=True).start()
    return await done


def build_remote_contexts(addresses: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT_S,
                          compiler_fn: Optional[Callable[[Any], Any]] = None
                          ) -> list[WorkerContext]:
  """One async TFF context per worker address, for TFF's mergeable context.

  Args:
    addresses: `host:port` of each running worker.
    timeout: Seconds a worker may stay unreachable before its calls raise
      `WorkerLost`.
    compiler_fn: The contexts' compiler (e.g. `execution.compile_for_cpp_worker`).

  Returns:
    The contexts, in the order of `addresses`.
  """
  contexts = []
  for address in addresses:
    config_lib.split_address(address)
    stub = _WatchedStub(address, timeout=timeout)
    context = tff.framework.AsyncExecutionContext(
        executor_fn=_executor_factory(stub), compiler_fn=compiler_fn,
        transform_args=tff.tensorflow.transform_args,
        transform_result=tff.tensorflow.transform_result)
    contexts.append(WorkerContext(context, address))
  return contexts


def check_workers(contexts: Sequence[WorkerContext], *,
                  timeout: float = DEFAULT_TIMEOUT_S) -> None:
  """Runs a tiny computation on every worker; raises for the first that fails.

  Raises:
    WorkerLost: A worker's port does not answer, or it did not compute within
      `timeout` seconds (it is then not a TFF worker, or is overloaded).
    WorkerFailed: It answered with an error.
  """

  @tff.tensorflow.computation(np.int32)
  def plus_one(x):
    return x + 1

  for context in contexts:
    address = context.address
    if not worker_server.reachable(address, timeout=min(timeout, 5.0)):
      raise WorkerLost(address, min(timeout, 5.0))
    result: list[Any] = []

    def call(context=context, result=result):
      try:
        result.append(asyncio.run(context.invoke(plus_one, 41)))
      except BaseException as e:  # pylint: disable=broad-except
        result.append(e)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
      raise WorkerLost(address, timeout)
    if isinstance(result[0], BaseException):
      if isinstance(result[0], (WorkerLost, WorkerFailed)):
        raise result[0]
      raise WorkerFailed(address, _first_line(str(result[0])))
    if int(result[0]) != 42:
      raise WorkerFailed(address, f"computed 41 + 1 = {result[0]}")


def describe_workers(addresses: Sequence[str], num_subrounds: int) -> str:
  """One line saying how a round's clients are spread over the workers."""
  return (f"execution: cpp on {len(addresses)} remote worker(s) {', '.join(addresses)}: "
          f"each round's clients in {num_subrounds} sub-round(s) spread over them "
          "(TFF's mergeable execution)")
