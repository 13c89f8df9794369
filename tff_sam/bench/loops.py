"""The timed training loops of the benchmark: TFF rounds and their plain equivalent.

`TffLoop` runs rounds of a composed TFF training process (`WorkersLoop`: on remote
TFF workers, with each worker's CPU and busy seconds); `PlainLoop` does the same
client work as a plain `tf.function` loop in this process; `time_loops` times them
side by side, round by round.
"""

import contextlib
import socket
import time
from typing import Any, Callable, Sequence, Union

import numpy as np
import psutil
import tensorflow as tf
import tensorflow_federated as tff

from tff_sam import config as config_lib
from tff_sam.data import pipeline
from tff_sam.federated.learning import processes
from tff_sam.models import build
from tff_sam.models import losses
from tff_sam.models import sam as sam_lib


class TffLoop:
  """Rounds of a TFF process over fixed clients; `step` returns the round's seconds.

  With `context` (e.g. a `tf_execution.TensorFlowExecutionContext`), each round runs
  under that TFF context instead of the installed one.
  """

  def __init__(self, process: tff.learning.templates.LearningProcess, state: Any,
               clients: Sequence[str], context: Any = None):
    self.process, self.state, self.clients = process, state, list(clients)
    self.context = context
    self.examples: list[int] = []

  def step(self, round_num: int) -> float:
    ids = [pipeline.round_client_id(c, round_num) for c in self.clients]
    installed = (contextlib.nullcontext() if self.context is None
                 else tff.framework.get_context_stack().install(self.context))
    with installed:
      t0 = time.perf_counter()
      result = self.process.next(self.state, ids)
      seconds = time.perf_counter() - t0
    self.state = result.state
    self.examples.append(int(result.metrics["client_work"]["train"]["num_examples"]))
    return seconds


class WorkersLoop(TffLoop):
  """A `TffLoop` whose rounds run on remote TFF workers (`--workers`), watched per worker.

  Each `step` also records, per worker, the CPU seconds its `worker_binary` used in
  the round (when it runs on this machine: the process listening on its port; else
  None) and its busy seconds (its sub-round, merge and after-merge calls), and the
  seconds during which two or more workers computed at the same time.
  """

  def __init__(self, process: tff.learning.templates.LearningProcess, state: Any,
               clients: Sequence[str], *, context: Any, worker_contexts: Sequence[Any]):
    super().__init__(process, state, clients, context=context)
    self.worker_contexts = list(worker_contexts)
    self.processes = {c.address: remote_worker_process(c.address) for c in self.worker_contexts}
    self.rounds: list[dict[str, Any]] = []

  def step(self, round_num: int) -> float:
    before = {a: _cpu_seconds(p) for a, p in self.processes.items()}
    for context in self.worker_contexts:
      context.busy.clear()
    seconds = super().step(round_num)
    cpu = {}
    for address, process in self.processes.items():
      after = _cpu_seconds(process)
      cpu[address] = None if after is None or before[address] is None else after - before[address]
    busy = {c.address: list(c.busy) for c in self.worker_contexts}
    self.rounds.append({"round_s": seconds, "cpu_s": cpu,
                        "busy_s": {a: sum(e - s for s, e in b) for a, b in busy.items()},
                        "overlap_s": concurrent_seconds(list(busy.values()))})
    return seconds


def remote_worker_process(address: str) -> Any:
  """The process of the remote worker at `address` when it runs on this machine (the
  one listening on its port), else None."""
  host, port = config_lib.split_address(address)
  if host not in ("localhost", "127.0.0.1", "::1", socket.gethostname()):
    return None
  with contextlib.suppress(psutil.Error, OSError):
    for conn in psutil.net_connections(kind="tcp"):
      if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
        return psutil.Process(conn.pid) if conn.pid else None
  return None


def _cpu_seconds(process: Any) -> Any:
  if process is None:
    return None
  try:
    times = process.cpu_times()
  except psutil.Error:
    return None
  return times.user + times.system


def concurrent_seconds(intervals: Sequence[Sequence[tuple[float, float]]]) -> float:
  """Seconds during which intervals of two or more of the lists overlap.

  Args:
    intervals: Per worker, its `(start, end)` busy intervals.
  """
  events = []
  for worker in intervals:
    for start, end in _union(worker):
      events += [(start, 1), (end, -1)]
  events.sort()
  busy, last, total = 0, None, 0.0
  for t, change in events:
    if busy >= 2 and last is not None:
      total += t - last
    busy += change
    last = t
  return total


def _union(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
  out: list[list[float]] = []
  for start, end in sorted(intervals):
    if out and start <= out[-1][1]:
      out[-1][1] = max(out[-1][1], end)
    else:
      out.append([start, end])
  return [(s, e) for s, e in out]


class PlainLoop:
  """The TFF round's client work as a plain `tf.function` loop in this process.

  Per client, one `tf.function` call: start from the global weights, a fresh client
  Adam state (TFF's own Adam), then every batch of the same `tf.data` pipeline (built
  inside the function from the client id, as TFF builds it), iterated with an
  iterator loop: forward, the same loss, gradients, Adam step, the same Dice metric.
  The server step is FedAvg's: the example-weighted mean of the client deltas,
  applied with SGD at learning rate 1. No robust aggregation (that is part of what
  the TFF round pays).
  """

  def __init__(self, *, bundle: sam_lib.SamBundle, spec: pipeline.PipelineSpec,
               clients: Sequence[str], config: config_lib.RunConfig):
    """Builds the loop.

    Args:
      bundle: The loaded model (its decoder's pretrained weights start the loop).
      spec: The clients' pipeline (the cached task's).
      clients: The clients, trained one after another every round.
      config: The TFF task's settings (prompt, loss, IoU head, client learning rate).
    """
    self.spec, self.clients = spec, list(clients)
    self.model = build.build_prompt_mask_decoder(bundle, prompt=config.prompt,
                                                 train_iou_head=config.train_iou_head)
    self.weights = [w.numpy() for w in self.model.trainable_weights]
    self.examples: list[int] = []
    self._client_update = _client_update_fn(
        self.model, spec, loss_fn=losses.MaskLoss(
            config.loss, iou_weight=1.0 if config.train_iou_head else 0.0),
        optimizer=processes.build_optimizer("adam", config.client_lr))

  def step(self, round_num: int) -> float:
    t0 = time.perf_counter()
    initial = tuple(tf.constant(w) for w in self.weights)
    total = [np.zeros_like(w) for w in self.weights]
    weight_sum, examples = 0.0, 0
    for c in self.clients:
      delta, num, _ = self._client_update(
          initial, tf.constant(pipeline.round_client_id(c, round_num)))
      n = int(num)
      for acc, d in zip(total, delta):
        acc += n * d.numpy()
      weight_sum += n
      examples += n
    self.weights = [w - acc / max(weight_sum, 1.0) for w, acc in zip(self.weights, total)]
    seconds = time.perf_counter() - t0
    self.examples.append(examples)
    return seconds


def _client_update_fn(model: tf.keras.Model, spec: pipeline.PipelineSpec, *,
                      loss_fn: tf.keras.losses.Loss,
                      optimizer: tff.learning.optimizers.Optimizer) -> Callable:
  """`(initial weights, client id) -> (delta, num_examples, loss_sum)`, compiled."""
  metric = losses.MeanDice()
  trainable = model.trainable_weights
  specs = tuple(tf.TensorSpec(w.shape, w.dtype) for w in trainable)

  # The dataset is built inside the function from the client id, as TFF builds it
  # (tf.data traces its map functions on every eager construction).
  @tf.function(input_signature=[specs, tf.TensorSpec([], tf.string)])
  def client_update(initial, client_id):
    dataset = pipeline.client_dataset(client_id, spec)
    for var, value in zip(trainable, initial):
      var.assign(value)
    metric.reset_state()
    state = optimizer.initialize(specs)
    num_examples = tf.constant(0, tf.int64)
    loss_sum = tf.constant(0.0)
    # An iterator loop (a while loop in this graph), as TFF's DATASET_ITERATOR.
    for batch in iter(dataset):
      with tf.GradientTape() as tape:
        prediction = model(batch["x"], training=True)
        loss = loss_fn(batch["y"], prediction)
      gradients = tape.gradient(loss, trainable)
      state, updated = optimizer.next(state, tuple(trainable), tuple(gradients))
      for var, value in zip(trainable, updated):
        var.assign(value)
      metric.update_state(batch["y"], prediction)
      size = tf.shape(batch["y"], out_type=tf.int64)[0]
      num_examples += size
      loss_sum += loss * tf.cast(size, tf.float32)
    delta = [value - var for var, value in zip(trainable, initial)]
    return delta, num_examples, loss_sum

  return client_update


def time_loops(loops: dict[str, Union[TffLoop, PlainLoop]], rounds: int,
               log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
  """Round 0 of each loop untimed (tracing), then rounds 1..N interleaved across loops."""
  out = {name: {"warmup_s": None, "round_s": []} for name in loops}
  for name, loop in loops.items():
    seconds = loop.step(0)
    out[name]["warmup_s"] = seconds
    log(f"  {name}: warm-up round (tracing) {seconds:.2f} s")
  for r in range(1, rounds + 1):
    for name, loop in loops.items():
      seconds = loop.step(r)
      out[name]["round_s"].append(seconds)
      log(f"  {name}: round {r}/{rounds} {seconds:.2f} s")
  for name, loop in loops.items():
    out[name]["mean_s"] = float(np.mean(out[name]["round_s"]))
    out[name]["examples_per_round"] = loop.examples[-1]
  return out
