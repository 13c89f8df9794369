"""Where TFF runs the program's computations: choosing, building, installing contexts.

`configure_tff_execution` installs one of two executions (`--execution`):

* `cpp`: TFF's local C++ execution context, its local worker (a `worker_binary`
  subprocess, `local_worker`) reached over gRPC on localhost, CPU only (it is built
  without CUDA);
* `tf`: `tf_execution.TensorFlowExecutionContext`, which runs the same computations
  from TFF's compiled forms with TensorFlow in this process, on its GPUs if any.

With `workers` (`--workers`), `cpp` runs on remote workers on other machines instead:
TFF's mergeable-computation context over one remote context per worker
(`build_remote_context`, `remote_workers`), each round's clients split over them.

`tf` is the default everywhere (`config.RunConfig.execution`); `cpp` runs when asked
for by name and for `--workers`. The local worker's lifecycle (its guardian, its
watch, ending it) is `local_worker`'s; turning backend failures into user errors is
`failures.user_errors`.
"""

import atexit
from typing import Any, Sequence

import tensorflow_federated as tff

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam.federated.backends import local_worker
from tff_sam.federated.backends import remote_workers
from tff_sam.federated.backends import tf_execution


def compile_for_cpp_worker(comp: tff.framework.ConcreteComputation
                           ) -> tff.framework.ConcreteComputation:
  """TFF's compilation for its C++ worker, with a lean static Grappler pass.

  TFF's own `desugar_and_transform_to_native` runs Grappler (aggressive constant
  folding, arithmetic, loop, memory and function optimization) over every
  TensorFlow graph in Python before the first call of a computation, then disables
  Grappler for the worker. Measured here (BENCHMARKS.md): that pass is most of a
  computation's first call (tiny model 21.4 s -> 6.8 s without it; MobileSAM decoder
  67 s -> 32 s). Without any pass, though, no function is inlined and a gradient
  keeps the whole model's backward pass (an online round at ViT-B size: the worker
  at 19.6 GB). So the pass runs with `tf_execution.lean_grappler` (function inlining,
  pruning, dependencies; what the `tf` execution's sessions run). Everything else is
  TFF's pipeline unchanged.

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
      grappler_config=tf_execution.lean_grappler())


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

  For `cpp` its local worker starts on first use (and gets a guardian,
  `local_worker.guard_local_workers`); for `tf` the clients' work is spread over
  every visible GPU when there are several.
  """
  if execution == config_lib.TF_EXECUTION:
    gpus = tf_execution.visible_gpus()
    return tf_execution.TensorFlowExecutionContext(devices=gpus if len(gpus) > 1 else ())
  if execution != config_lib.CPP_EXECUTION:
    raise ValueError(f"unknown execution {execution!r}")
  local_worker.guard_local_workers()
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
  (`remote_workers.build_remote_contexts`); each computation is compiled to
  `MergeableCompForm` and its clients are split into `max(num_subrounds,
  len(workers))` sub-rounds, run on the workers in parallel and merged. Every worker
  is first checked with a tiny computation.

  Args:
    workers: `host:port` of each worker (`python -m tff_sam.experiments.worker`).
    timeout: Seconds a worker may stay unreachable before a computation raises
      `remote_workers.WorkerLost` (TFF alone would retry forever).
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
    atexit.register(local_worker.end_local_workers)
    _ATEXIT_REGISTERED.append(True)
  local_worker.guard_local_workers()


_ATEXIT_REGISTERED: list[bool] = []
