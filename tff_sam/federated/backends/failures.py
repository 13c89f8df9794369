"""Backend failures as user errors: the one place that words them.

A computation fails in the backend in four ways, each raised as its own exception
where it is detected:

* the local worker died (`local_worker.LocalWorkerDied`: the kernel's out-of-memory
  killer, or the worker stopped by itself), which TFF would restart and retry
  forever;
* a remote worker stopped answering (`remote_workers.WorkerLost`) or reported an
  error (`remote_workers.WorkerFailed`);
* `--execution=tf` ran out of device memory (`tf_execution.OutOfDeviceMemory`).

`user_errors` runs a body (the training program's run, the benchmark's sections)
under the local worker's watch and turns each of them into one `errors.UserError`
line naming the section it happened in.
"""

import contextlib
from pathlib import Path
from typing import Iterator, MutableMapping, Optional

from tff_sam import errors
from tff_sam.federated.backends import local_worker
from tff_sam.federated.backends import remote_workers
from tff_sam.federated.backends import tf_execution

_RESUMES = "then run the same command again: it resumes from the last saved round"


def _local_worker_message(error: local_worker.LocalWorkerDied, section: str) -> str:
  if error.how.startswith("exit code"):
    cause = "it stopped by itself: its own messages above say why"
  else:
    cause = ("it is usually the kernel's out-of-memory killer (see `dmesg`). Try a smaller "
             "--batch_size, fewer clients per round or --clients_per_subround "
             "(docs/execution.md, 'Many clients per round: memory')")
  return f"{error} during {section}; {cause}"


def _message(error: Exception, section: str, *, resumable: bool) -> str:
  """The one line for a backend failure `error` during `section`."""
  if isinstance(error, local_worker.LocalWorkerDied):
    return _local_worker_message(error, section)
  if isinstance(error, tf_execution.OutOfDeviceMemory):
    what = f"out of device memory during {section} (--execution=tf: {error})"
    return (f"{what}; lower --batch_size or --prompts_per_image (or use --embedding_cache "
            f"in online mode), {_RESUMES}" if resumable else what)
  if not resumable:
    return f"{error} during {section}"
  if isinstance(error, remote_workers.WorkerLost):
    return (f"{error} during {section}; restart it there (python -m "
            f"tff_sam.experiments.worker --port PORT) or remove it from --workers, {_RESUMES}")
  return (f"{error} (during {section}); the README's 'Several machines' says what a worker "
          "machine needs")


@contextlib.contextmanager
def user_errors(progress: MutableMapping[str, str], *, resumable: bool = True,
                pid_file: Optional[Path] = None, interval: float = 0.5) -> Iterator[None]:
  """Runs the body under the local worker's watch; backend failures become user errors.

  Args:
    progress: `progress["section"]` names what the body is doing (`setup` until the
      body says otherwise); the body updates it, and the error names the section the
      failure happened in.
    resumable: The same command resumes the work (the training program): the
      messages say how to go on. Otherwise (the benchmark, which starts over) a
      remote worker's or the device's failure is named with its section only.
    pid_file: Where the running local workers are recorded
      (`local_worker.end_orphaned_local_workers`).
    interval: Seconds between the watch's looks at this process's children.

  Raises:
    errors.UserError: The local worker died (instead of the `KeyboardInterrupt` the
      watch sent to stop TFF's retries), a remote worker was lost or failed, or the
      device ran out of memory. A real Ctrl-C still raises `KeyboardInterrupt`.
  """
  progress.setdefault("section", "setup")
  try:
    with local_worker.local_worker_watched(interval=interval, pid_file=pid_file):
      yield
  except (local_worker.LocalWorkerDied, remote_workers.WorkerLost, remote_workers.WorkerFailed,
          tf_execution.OutOfDeviceMemory) as e:
    raise errors.UserError(_message(e, progress["section"], resumable=resumable)) from None
