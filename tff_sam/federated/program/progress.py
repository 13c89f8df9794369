"""Progress inside a round: how far the sampled clients' local training has come.

A round is one call into TFF's execution context (`tf`, or a local or remote worker),
which trains every sampled client; without help the Python process learns nothing
until the round ends (minutes on a CPU). The training pipeline reports from inside it
(`data.pipeline`, `PipelineSpec.progress_dir`): each time a client takes a batch it
overwrites the file `<progress_dir>/<client>@<round>` with the number of batches
taken. `RoundProgress` polls those files while a round runs and reports clients
finished and images trained with the elapsed time: on a terminal as one line on stderr
that updates in place (cleared before anything else is printed), elsewhere (a log
file, a notebook) as one line per client that finishes.
"""

import sys
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, TextIO

from tff_sam.data import pipeline


def read_batches(path: Path) -> int:
  """Batches a client reported in `path` (0 if not yet written or mid-write)."""
  try:
    return int(path.read_text().strip() or 0)
  except (OSError, ValueError):
    return 0


def describe(done: Mapping[str, int], *, expected: Mapping[str, int], batch_size: int,
             images: Mapping[str, int], elapsed: float, round_num: int,
             finished: Optional[int] = None) -> str:
  """The progress line: clients finished (default: counted from `done`), images
  trained, seconds elapsed."""
  if finished is None:
    finished = sum(done.get(c, 0) >= n for c, n in expected.items())
  trained = sum(min(done.get(c, 0) * batch_size, images[c]) for c in expected)
  return (f"  round {round_num}: {finished}/{len(expected)} clients done, "
          f"{trained}/{sum(images.values())} images trained, {elapsed:.0f} s")


class RoundProgress:
  """Reports the progress of one round while it runs (a context manager).

  Args:
    progress_dir: The pipeline's `progress_dir`.
    round_num: The round.
    expected: Client id (as passed to the process, `<client>@<round>`) -> batches it
      takes this round (`pipeline.expected_batches`).
    images: Client id -> images it trains on this round (epochs included).
    batch_size: Images per batch.
    log: Where per-client lines go when `stream` is not a terminal.
    stream: The terminal stream for the updating line.
    interval: Seconds between looks at the files.
  """

  def __init__(self, *, progress_dir: Path, round_num: int, expected: Mapping[str, int],
               images: Mapping[str, int], batch_size: int,
               log: Callable[[str], None] = print, stream: Optional[TextIO] = None,
               interval: float = 1.0):
    self.progress_dir = Path(progress_dir)
    self.round_num = round_num
    self.expected = dict(expected)
    self.images = dict(images)
    self.batch_size = batch_size
    self.log = log
    self.stream = stream if stream is not None else sys.stderr
    self.interval = interval
    self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self.reported: set[str] = set()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="round-progress", daemon=True)
    self._start = 0.0
    self._shown = False

  def __enter__(self) -> "RoundProgress":
    self.progress_dir.mkdir(parents=True, exist_ok=True)
    for client in self.expected:  # A resumed round starts from zero.
      (self.progress_dir / client).unlink(missing_ok=True)
    self._start = time.monotonic()
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join(timeout=5)
    if exc[0] is None:
      self.poll()  # Clients that finished since the last look are reported too.
    if self._shown:  # Clear the updating line so the next line starts clean.
      self.stream.write("\r\033[K")
      self.stream.flush()
    for client in self.expected:
      (self.progress_dir / client).unlink(missing_ok=True)

  def poll(self) -> dict[str, int]:
    """Looks at the files once; reports newly finished clients; returns batches done."""
    done = {c: read_batches(self.progress_dir / c) for c in self.expected}
    elapsed = time.monotonic() - self._start
    args = dict(expected=self.expected, batch_size=self.batch_size, images=self.images,
                elapsed=elapsed, round_num=self.round_num)
    if self.tty:
      self.stream.write("\r\033[K" + describe(done, **args))
      self.stream.flush()
      self._shown = True
      return done
    # Clients that finished since the last look, in the order they did (their files'
    # last writes): the k-th says k clients done, even when several finished at once.
    newly = sorted((c for c, n in self.expected.items()
                    if done[c] >= n and c not in self.reported), key=self._finished_at)
    for client in newly:
      self.reported.add(client)
      line = describe(done, finished=len(self.reported), **args)
      self.log(f"{line}  ({client.rsplit('@', 1)[0]} finished)")
    return done

  def _finished_at(self, client: str) -> float:
    try:
      return (self.progress_dir / client).stat().st_mtime
    except OSError:
      return float("inf")

  def _run(self) -> None:
    while not self._stop.wait(self.interval):
      self.poll()


def _fmt(value: Optional[float], digits: int = 4) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def round_line(round_num: int, row: dict, *, total: int, num_objects: int) -> str:
  """The line printed after round `round_num` from its `metrics.csv` row."""
  if round_num == 0:
    validation = (f"  val dice {_fmt(row['val_dice'])}" if row.get("val_dice") is not None
                  else "")
    return (f"round 0/{total}  zero-shot test dice {row['test_dice']:.4f}  "
            f"iou {row['test_iou']:.4f}  mSA {_fmt(row.get('test_msa'))}  ({num_objects} objects)  "
            f"federated eval dice {_fmt(row['fed_eval_dice'])}{validation}")
  robust = "  ".join(f"{k.split('_')[0]} {row[k]}" for k in
                     ("nonfinite_clients", "zeroed_clients", "clipped_clients") if row.get(k))
  epsilon = row.get("dp_epsilon")
  validation = (f"val dice {_fmt(row['val_dice'])}  " if row.get("val_dice") is not None
                else "")
  test = (f"test dice {_fmt(row['test_dice'])}  iou {_fmt(row['test_iou'])}  "
          f"mSA {_fmt(row.get('test_msa'))}  fed eval dice {_fmt(row['fed_eval_dice'])}  "
          if row.get("test_dice") is not None or not validation else "")
  return (f"round {round_num}/{total}  loss {row['train_loss']:.4f}  {validation}{test}"
          f"({row['seconds']:.1f} s)"
          + (f"  DP epsilon {epsilon:.3g}" if epsilon is not None else "")
          + (f"  robust aggregation: {robust}" if robust else ""))


class ReportingProcess:
  """A training process whose `next` reports the round's progress while it runs.

  Args:
    process: The composed training process (`next(state, client_ids)`).
    progress_dir: Where the clients' pipelines report (`PipelineSpec.progress_dir`).
    images: Each client's training images.
    spec: The clients' `pipeline.PipelineSpec`.
    log: Where lines go when not on a terminal.
  """

  def __init__(self, process, *, progress_dir: Path, images: dict[str, int],
               spec, log: Callable[[str], None]):
    self.process = process
    self.progress_dir = progress_dir
    self.images = images
    self.spec = spec
    self.log = log

  def next(self, state, client_ids: list[str]):
    per_round = {c: self.images[c.rsplit(pipeline.ROUND_SEPARATOR, 1)[0]] for c in client_ids}
    round_num = int(client_ids[0].rsplit(pipeline.ROUND_SEPARATOR, 1)[1]) if client_ids else 0
    with RoundProgress(
        progress_dir=self.progress_dir, round_num=round_num, batch_size=self.spec.batch_size,
        expected={c: pipeline.expected_batches(n, self.spec) for c, n in per_round.items()},
        images={c: n * self.spec.local_epochs for c, n in per_round.items()}, log=self.log):
      return self.process.next(state, client_ids)
