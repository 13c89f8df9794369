"""The benchmark behind `python -m tff_sam.experiments.bench` (no flags here).

`run_benchmark(config)` measures, side by side in one run, on synthetic images written
into a fresh work folder (so every embedding is really computed):

1. **Cache speed-up**: wall time of one federated round, online (`--noembedding_cache`:
   the TFF model runs the frozen image encoder at every step) vs cached (the model
   reads precomputed embeddings), same clients, same data, same prompts, same local
   steps and batch size. The embedding precompute is timed separately (end to end,
   and the encoder alone in steady state).
2. **TFF overhead**: the same client work as a plain `tf.function` training loop in
   this process (same model class, loss, metric, Adam, datasets; one client after
   another, each starting from the global weights; example-weighted mean of the
   deltas) vs the TFF round.
3. **Memory**: peak RSS (the process plus all its descendants, TFF's `worker_binary`
   included) of a fresh subprocess running one cached round in which every client
   participates, `memory_clients` vs `memory_base_clients` clients with the same
   per-client data (the clients' manifests share the record files on disk); also the
   `memory_clients` population with `memory_base_clients` sampled, and all
   `memory_clients` in subrounds of `memory_base_clients` (`--clients_per_subround`).
4. **Communication**: bytes broadcast to and uploaded from each client per round,
   from the type signatures of the broadcast and aggregation intrinsics inside the
   processes' `next` computation: cached (decoder-only), online (encoder broadcast
   too) and full-model fine-tuning (every weight both ways, derived from the
   parameter counts).
5. **Throughput**: decoder training examples/s from cached embeddings and embedding
   precompute images/s, for `arch` and for MobileSAM when its weights are present.

Wall times exclude the first (tracing) round of every loop and average
`config.rounds` timed rounds, interleaved round by round across the loops. The TFF
processes are built as `tff_sam.program.run_experiment` builds them (robust
aggregation on); `config.loop_implementation` can swap their client training loop
(`tff.learning.LoopImplementation`), and the cached round is also timed with the other
loop (`compared_loop`) for comparison.

The caller installs TFF's execution context first (`runtime.configure_tff_execution`).
If TFF's `worker_binary` dies (the kernel's out-of-memory killer), TFF would restart it
and retry forever; `runtime.worker_watched` ends the run with an error instead.
"""

import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np

from tff_sam import errors
from tff_sam import fileio
from tff_sam import runtime

if TYPE_CHECKING:  # Annotations only: these modules load TensorFlow, imported lazily below.
  import tff_sam.client_data  # pylint: disable=g-bad-import-order
  import tff_sam.data
  import tff_sam.embeddings
  import tff_sam.model

ARCHS = ("vit_b", "tiny", "mobile_sam")
# SAM ViT-B (`transformers.SamConfig()` defaults): 93.7 M weights, i.e. the PyTorch
# checkpoint's 93,735,472 parameters plus the 2x128 random Fourier matrix of the
# positional embedding (a buffer in PyTorch, a weight in TF).
VIT_B_PARAMETERS = 93_735_728
BENCH_JSON = "bench.json"
# The client training loop of the TFF processes: `program` = as
# `federated.build_training_process` builds it, else that `tff.learning.LoopImplementation`.
LOOP_IMPLEMENTATIONS = ("program", "dataset_iterator", "dataset_reduce")


def compared_loop(loop_implementation: str) -> str:
  """The client loop the cached round is also timed with, for comparison.

  TFF's default `dataset_reduce`, or `dataset_iterator` when the run uses
  `dataset_reduce`.
  """
  return "dataset_iterator" if loop_implementation == "dataset_reduce" else "dataset_reduce"

# Goals of the benchmark: (key, comparison, threshold).
GOALS = (("cache_speedup", ">=", 20.0), ("tff_overhead", "<=", 1.2),
         ("memory_ratio_64_vs_4", "<=", 1.3), ("memory_ratio_64_vs_4_subrounds", "<=", 1.3))
_MB = 1e6
_GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """The benchmark's settings (the flags of `tff_sam.experiments.bench`, one to one).

  Attributes:
    output_dir: Where `bench.json` (and, during the run, the work folder) goes.
    arch: `vit_b` (SAM ViT-B architecture, random weights), `tiny` or `mobile_sam`.
    clients: Clients per round in sections 1, 2 and 5 (all participate).
    examples_per_client: Images per client (same count in the memory section).
    batch_size: Images per local batch.
    prompts_per_image: Prompts (objects) per image per local epoch.
    rounds: Timed rounds per loop (after one untimed warm-up round).
    image_size: Side of the synthetic images (SAM resizes them to its input size).
    encode_batch_size: Images per encoder call in the precompute.
    memory_clients: Clients of the large memory run.
    memory_base_clients: Clients of the small memory run (and sampled per round in
      the large population run).
    memory_interval: Seconds between RSS samples.
    max_concurrent_computation_calls: TFF's C++ runtime limit (-1 = none, as the
      training binary runs), also used by the memory subprocesses.
    mobile_sam: Also measure MobileSAM's throughput when its weights are present.
    cache_dir: Cache root holding converted MobileSAM weights (default
      `$TFF_SAM_CACHE` or `~/.cache/tff_sam`); embeddings go to the work folder.
    client_lr: Client Adam learning rate.
    loop_implementation: The client training loop of every TFF process of the run
      (`LOOP_IMPLEMENTATIONS`); the cached round is also timed with
      `compared_loop(loop_implementation)` for comparison.
    seed: Seed of the synthetic images and the prompts.
    keep_work: Keep the work folder (images, records, manifests) after the run.
  """

  output_dir: str = "runs/bench"
  arch: str = "vit_b"
  clients: int = 2
  examples_per_client: int = 4
  # Batch 1 (training and encoding): with two clients, online mode at ViT-B size peaked
  # at 9.8 GiB in TFF's worker at batch 1 and at over 14 GiB at batch 2 (BENCHMARKS.md).
  batch_size: int = 1
  # One box per image: the unit of the ceiling ("decoder step 0.11 s/example")
  # and of the published federated-SAM recipes, where an example is one prompted image.
  # Every extra prompt re-runs the decoder over the whole image embedding, so with 4 the
  # decoder step costs about 4x and the cached round's lead shrinks (BENCHMARKS.md).
  prompts_per_image: int = 1
  rounds: int = 3
  image_size: int = 256
  encode_batch_size: int = 1
  memory_clients: int = 64
  memory_base_clients: int = 4
  memory_interval: float = 0.1
  max_concurrent_computation_calls: int = -1
  mobile_sam: bool = True
  cache_dir: Optional[str] = None
  client_lr: float = 1e-5
  loop_implementation: str = "program"
  seed: int = 0
  keep_work: bool = False

  def validate(self) -> "BenchConfig":
    """Checks every field; returns self.

    Raises:
      errors.ConfigError: naming the first invalid flag.
    """
    errors.require(bool(self.output_dir), "output_dir", "must be set")
    errors.require(self.arch in ARCHS, "arch", f"must be one of {ARCHS}, got {self.arch!r}")
    for flag in ("clients", "examples_per_client", "batch_size", "prompts_per_image",
                 "encode_batch_size", "memory_base_clients"):
      value = getattr(self, flag)
      errors.require(value >= 1, flag, f"must be >= 1, got {value}")
    errors.require(self.rounds >= 2, "rounds", f"must be >= 2 timed rounds, got {self.rounds}")
    errors.require(self.image_size >= 32, "image_size", f"must be >= 32 pixels, got {self.image_size}")
    errors.require(self.memory_clients > self.memory_base_clients, "memory_clients",
                   f"must be > --memory_base_clients ({self.memory_base_clients}), got "
                   f"{self.memory_clients}")
    errors.require(self.memory_interval > 0, "memory_interval",
                   f"must be > 0 seconds, got {self.memory_interval}")
    errors.require(self.max_concurrent_computation_calls == -1
                   or self.max_concurrent_computation_calls >= 1, "max_concurrent_computation_calls",
                   f"must be -1 (no limit) or >= 1, got {self.max_concurrent_computation_calls}")
    errors.require(self.client_lr > 0, "client_lr", f"must be > 0, got {self.client_lr}")
    errors.require(self.loop_implementation in LOOP_IMPLEMENTATIONS, "loop_implementation",
                   f"must be one of {LOOP_IMPLEMENTATIONS}, got {self.loop_implementation!r}")
    errors.require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
    return self

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ------------------------------------------------------------------- machine, models


def machine_info() -> dict[str, Any]:
  """CPU model, cores, RAM and the library versions the numbers were taken with."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  cpu = "unknown"
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  ram = None
  try:
    for line in Path("/proc/meminfo").read_text().splitlines():
      if line.startswith("MemTotal:"):
        ram = int(line.split()[1]) * 1024
        break
  except OSError:
    pass
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": ram,
          "load_average_at_start": list(load) if load else None,
          "python": sys.version.split()[0], "tensorflow": tf.__version__,
          "tensorflow_federated": tff.__version__, "transformers": transformers.__version__}


def vit_b_random_bundle() -> "tff_sam.model.SamBundle":
  """A `SamBundle` with SAM ViT-B's architecture and random weights (for timing).

  The fingerprint is unique per call, so its embeddings are never reused.
  """
  from transformers import SamConfig, TFSamModel  # pylint: disable=g-import-not-at-top,g-multiple-import

  from tff_sam import model as model_lib  # pylint: disable=g-import-not-at-top

  config = SamConfig()
  sam = TFSamModel(config)
  # build_in_name_scope, not build(): see model._build_tiny.
  sam.build_in_name_scope()
  return model_lib.SamBundle(
      name="vit_b (random init)", sam=sam, processor=model_lib.build_image_processor(config),
      fingerprint=f"bench-vit_b-random-{uuid.uuid4().hex[:12]}")


def load_bundle(arch: str, *, cache_dir: Optional[Path] = None) -> "tff_sam.model.SamBundle":
  """The `SamBundle` of a benchmark architecture (`ARCHS`).

  Raises:
    errors.UserError: MobileSAM's weights are missing and cannot be fetched.
  """
  from tff_sam import model as model_lib  # pylint: disable=g-import-not-at-top

  if arch == "vit_b":
    return vit_b_random_bundle()
  return model_lib.load_sam(arch, cache_dir=cache_dir)


def _count(weights) -> int:
  return int(sum(int(np.prod(w.shape)) for w in weights))


def parameter_counts(bundle: "tff_sam.model.SamBundle") -> dict[str, int]:
  """Weights of the model as used: image encoder, prompt encoder + decoder, total.

  `trainable` is what the federated processes train (the mask decoder incl. its IoU
  head); `prompt_decoder` adds the frozen prompt encoder and positional embedding.
  """
  from tff_sam import model as model_lib  # pylint: disable=g-import-not-at-top

  encoder = bundle.image_encoder if bundle.image_encoder is not None else (
      bundle.sam.vision_encoder)
  decoder = model_lib.build_prompt_mask_decoder(bundle)
  counts = {"image_encoder": _count(encoder.weights),
            "prompt_decoder": _count(model_lib.prompt_decoder_weights(bundle.sam).values()),
            "trainable": _count(decoder.trainable_weights)}
  counts["total"] = counts["image_encoder"] + counts["prompt_decoder"]
  return counts


# ------------------------------------------------------------------- communication


def type_bytes(type_spec) -> int:
  """Bytes of a value of a TFF type: element counts x dtype sizes, over its tensors.

  Federated types count their member once (the value one client sends or receives).
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  if isinstance(type_spec, tff.types.FederatedType):
    return type_bytes(type_spec.member)
  if isinstance(type_spec, tff.types.TensorType):
    if type_spec.shape is None or any(d is None for d in type_spec.shape):
      raise ValueError(f"tensor of unknown shape in {type_spec}")
    return int(np.prod(type_spec.shape, dtype=np.int64)) * np.dtype(type_spec.dtype).itemsize
  if isinstance(type_spec, tff.types.StructType):
    return sum(type_bytes(t) for t in type_spec)
  raise ValueError(f"cannot size a value of type {type_spec}")


def _placed_bytes(type_spec, placement) -> int:
  """Bytes of the parts of `type_spec` placed at `placement`."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  if isinstance(type_spec, tff.types.FederatedType):
    return type_bytes(type_spec.member) if type_spec.placement is placement else 0
  if isinstance(type_spec, tff.types.StructType):
    return sum(_placed_bytes(t, placement) for t in type_spec)
  return 0


def communication(process: Any) -> dict[str, Any]:
  """Bytes each client receives and sends per round, from `process.next`'s intrinsics.

  Walks the building block of `process.next`: every broadcast intrinsic
  (`federated_broadcast`, ...) sends its server value to each client; every
  aggregation intrinsic (`federated_sum`, `federated_mean`, ...) takes each client's
  value. The model's share is identified by type: the broadcast of the model weights
  (`process.get_model_weights`'s result type) and the aggregation of an update
  shaped like the trainable weights.

  Returns:
    `broadcast`, `upload` (totals), `broadcast_model`, `upload_update`, the rest
    (`broadcast_other`, `upload_other`: optimizer hyper-parameters, robust
    aggregation norms and counts, client weight, metrics) and the intrinsic calls.
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  weights_type = process.get_model_weights.type_signature.result
  trainable_type = weights_type.trainable
  calls = []

  def visit(comp):
    if isinstance(comp, tff.framework.Call) and isinstance(comp.function, tff.framework.Intrinsic):
      definition = comp.function.intrinsic_def()
      arg = comp.argument.type_signature if comp.argument is not None else None
      if definition.broadcast_kind is not None and arg is not None:
        calls.append({"intrinsic": comp.function.uri, "direction": "broadcast",
                      "bytes": _placed_bytes(arg, tff.SERVER),
                      "model": _struct_equivalent(arg, weights_type)})
      elif definition.aggregation_kind is not None and arg is not None:
        calls.append({"intrinsic": comp.function.uri, "direction": "upload",
                      "bytes": _placed_bytes(arg, tff.CLIENTS),
                      "model": _contains_equivalent(arg, trainable_type)})
    return comp, False

  tff.framework.transform_postorder(process.next.to_building_block(), visit)
  broadcast = sum(c["bytes"] for c in calls if c["direction"] == "broadcast")
  upload = sum(c["bytes"] for c in calls if c["direction"] == "upload")
  model_broadcast = [c for c in calls if c["direction"] == "broadcast" and c["model"]]
  model_upload = [c for c in calls if c["direction"] == "upload" and c["model"]]
  if len(model_broadcast) != 1 or len(model_upload) != 1:
    raise ValueError(f"expected one model broadcast and one update aggregation, found "
                     f"{len(model_broadcast)} and {len(model_upload)}")
  update = type_bytes(trainable_type)
  return {"broadcast": broadcast, "upload": upload,
          "broadcast_model": model_broadcast[0]["bytes"], "upload_update": update,
          "broadcast_other": broadcast - model_broadcast[0]["bytes"],
          "upload_other": upload - update,
          "model_weights": type_bytes(weights_type),
          "intrinsics": [{k: c[k] for k in ("intrinsic", "direction", "bytes")} for c in calls]}


def _struct_equivalent(type_spec, target) -> bool:
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  if isinstance(type_spec, tff.types.FederatedType):
    type_spec = type_spec.member
  return _flat_tensor_types(type_spec) == _flat_tensor_types(target)


def _contains_equivalent(type_spec, target) -> bool:
  """Whether a part of `type_spec` (client-placed) has `target`'s tensors."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  if isinstance(type_spec, tff.types.FederatedType):
    return type_spec.placement is tff.CLIENTS and _struct_equivalent(type_spec, target)
  if isinstance(type_spec, tff.types.StructType):
    return any(_contains_equivalent(t, target) for t in type_spec)
  return False


def _flat_tensor_types(type_spec) -> list[tuple]:
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  if isinstance(type_spec, tff.types.TensorType):
    return [(tuple(type_spec.shape), np.dtype(type_spec.dtype).str)]
  if isinstance(type_spec, tff.types.StructType):
    return [x for t in type_spec for x in _flat_tensor_types(t)]
  return [("other", str(type_spec))]


def bytes_per_client_round(*, cached: dict, online: dict, parameters: dict[str, int]
                           ) -> dict[str, Any]:
  """The communication table: cached, online and full-model fine-tuning.

  Full-model fine-tuning (every weight trained, as the published federated-SAM
  recipes do) is derived: all float32 weights both ways plus the online process's
  non-model traffic; no such process is built.
  """
  def mode(c: dict, note: str) -> dict[str, Any]:
    out = {k: c[k] for k in ("broadcast", "upload", "broadcast_model", "upload_update",
                             "broadcast_other", "upload_other")}
    out["total"] = c["broadcast"] + c["upload"]
    out["note"] = note
    return out

  full_weights = 4 * parameters["total"]
  full = {"broadcast": full_weights + online["broadcast_other"],
          "upload": full_weights + online["upload_other"],
          "broadcast_model": full_weights, "upload_update": full_weights,
          "broadcast_other": online["broadcast_other"], "upload_other": online["upload_other"]}
  return {
      "cached": mode(cached, "decoder-only: prompt encoder + mask decoder broadcast, "
                     "mask decoder update uploaded (from the process's type signatures)"),
      "online": mode(online, "online mode: frozen image encoder broadcast with the "
                     "decoder every round, mask decoder update uploaded (from the "
                     "process's type signatures)"),
      "full_model": mode(full, "full-model fine-tuning: all float32 weights both ways "
                         "(derived: 4 bytes x parameters + the online process's other "
                         "traffic)"),
      "parameters": dict(parameters),
      "intrinsics": {"cached": cached["intrinsics"], "online": online["intrinsics"]},
  }


# ------------------------------------------------------------------- data and loops


def write_examples(folder: Path, *, count: int, size: int, seed: int
                   ) -> list["tff_sam.data.Example"]:
  """Writes `count` synthetic image/mask pairs (rotating sites); returns the examples."""
  import cv2  # pylint: disable=g-import-not-at-top

  from tff_sam import data  # pylint: disable=g-import-not-at-top
  from tff_sam import synthetic  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  for sub in ("images", "masks"):
    (folder / sub).mkdir(parents=True, exist_ok=True)
  for i in range(count):
    image, labels = synthetic.render_example(rng, site=i, height=size, width=size)
    cv2.imwrite(str(folder / "images" / f"ex{i:04d}.png"), image[..., ::-1])
    cv2.imwrite(str(folder / "masks" / f"ex{i:04d}.png"), labels)
  return data.list_examples(folder)


def pipeline_spec(bundle: "tff_sam.model.SamBundle", manifest_dir: Path, config: BenchConfig, *,
                  online: bool) -> "tff_sam.client_data.PipelineSpec":
  """The client pipeline of the benchmark (the training program's, box prompts)."""
  from tff_sam import client_data  # pylint: disable=g-import-not-at-top

  return client_data.build_pipeline_spec(
      bundle, manifest_dir, online=online, prompt="box",
      prompts_per_image=config.prompts_per_image, local_epochs=1,
      batch_size=config.batch_size, seed=config.seed)


def build_process(*, sam_config, spec: "tff_sam.client_data.PipelineSpec",
                  client_ids: Sequence[str], client_lr: float,
                  online_encoder: Optional[str] = None,
                  loop_implementation: str = "program"):
  """The composed training process of `tff_sam.program.run_experiment` (defaults).

  Args:
    sam_config: The `SamConfig`.
    spec: The client pipeline.
    client_ids: The clients `ClientData` knows.
    client_lr: Client Adam learning rate.
    online_encoder: None (cached embeddings) or the online mode's encoder kind.
    loop_implementation: `program`: `federated.build_training_process`'s default
      loop, as the program builds it. `dataset_iterator` or `dataset_reduce`: the
      same process with that `tff.learning.LoopImplementation` client loop.
  """
  from tff_sam import client_data  # pylint: disable=g-import-not-at-top
  from tff_sam import federated  # pylint: disable=g-import-not-at-top

  cdata = client_data.build_client_data(list(client_ids), spec)
  model_fn = federated.build_model_fn(
      sam_config=sam_config, input_spec=cdata.element_type_structure, prompt="box",
      loss="dice_ce", train_iou_head=True, online_encoder=online_encoder)
  loop = {} if loop_implementation == "program" else {"loop_implementation": loop_implementation}
  process = federated.build_training_process(model_fn=model_fn, client_lr=client_lr,
                                             server_optimizer="sgd", server_lr=1.0, **loop)
  return federated.compose_with_client_data(process, cdata)


class TffLoop:
  """Rounds of a TFF process over fixed clients; `step` returns the round's seconds."""

  def __init__(self, process: Any, state: Any, clients: Sequence[str]):
    self.process, self.state, self.clients = process, state, list(clients)
    self.examples: list[int] = []

  def step(self, round_num: int) -> float:
    from tff_sam import client_data  # pylint: disable=g-import-not-at-top

    ids = [client_data.round_client_id(c, round_num) for c in self.clients]
    t0 = time.perf_counter()
    result = self.process.next(self.state, ids)
    seconds = time.perf_counter() - t0
    self.state = result.state
    self.examples.append(int(result.metrics["client_work"]["train"]["num_examples"]))
    return seconds


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

  def __init__(self, *, bundle: "tff_sam.model.SamBundle",
               spec: "tff_sam.client_data.PipelineSpec", clients: Sequence[str],
               client_lr: float):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from tff_sam import client_data  # pylint: disable=g-import-not-at-top
    from tff_sam import federated  # pylint: disable=g-import-not-at-top
    from tff_sam import losses  # pylint: disable=g-import-not-at-top
    from tff_sam import model as model_lib  # pylint: disable=g-import-not-at-top

    self.spec, self.clients = spec, list(clients)
    self.model = model_lib.build_prompt_mask_decoder(bundle, prompt="box", train_iou_head=True)
    self.weights = [w.numpy() for w in self.model.trainable_weights]
    self.examples: list[int] = []
    loss_fn = losses.MaskLoss("dice_ce", iou_weight=1.0)
    metric = losses.MeanDice()
    optimizer = federated.build_optimizer("adam", client_lr)
    trainable = self.model.trainable_weights
    specs = tuple(tf.TensorSpec(w.shape, w.dtype) for w in trainable)
    model = self.model

    # The dataset is built inside the function from the client id, as TFF builds it
    # (tf.data traces its map functions on every eager construction).
    @tf.function(input_signature=[specs, tf.TensorSpec([], tf.string)])
    def client_update(initial, client_id):
      dataset = client_data.client_dataset(client_id, spec)
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

    self._client_update = client_update

  def step(self, round_num: int) -> float:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from tff_sam import client_data  # pylint: disable=g-import-not-at-top

    t0 = time.perf_counter()
    initial = tuple(tf.constant(w) for w in self.weights)
    total = [np.zeros_like(w) for w in self.weights]
    weight_sum, examples = 0.0, 0
    for c in self.clients:
      delta, num, _ = self._client_update(
          initial, tf.constant(client_data.round_client_id(c, round_num)))
      n = int(num)
      for acc, d in zip(total, delta):
        acc += n * d.numpy()
      weight_sum += n
      examples += n
    self.weights = [w - acc / max(weight_sum, 1.0) for w, acc in zip(self.weights, total)]
    seconds = time.perf_counter() - t0
    self.examples.append(examples)
    return seconds


def time_loops(loops: dict[str, Any], rounds: int, log: Callable[[str], None]
               ) -> dict[str, dict[str, Any]]:
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


def precompute(bundle: "tff_sam.model.SamBundle", examples: Sequence["tff_sam.data.Example"], *,
               cache_root: Path, batch_size: int
               ) -> tuple[list["tff_sam.embeddings.Record"], dict[str, float]]:
  """Embeds every example (records as `build_records` writes them), timed.

  Returns the records and `precompute_s` (end to end: reading, preprocessing,
  encoder tracing and calls, writing), `encoder_s_per_image` (the encoder alone,
  steady state: a second pass after a warm-up call) and the rates.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from tff_sam import data  # pylint: disable=g-import-not-at-top
  from tff_sam import embeddings  # pylint: disable=g-import-not-at-top
  from tff_sam import model as model_lib  # pylint: disable=g-import-not-at-top
  from tff_sam import preprocess  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  records, stats = embeddings.build_records(
      examples, bundle=bundle, cache_root=cache_root, binary_components=False,
      batch_size=batch_size, show_progress=False)
  precompute_s = time.perf_counter() - t0
  if stats.encoded != len(examples):
    raise RuntimeError(f"expected {len(examples)} fresh embeddings, encoded {stats.encoded}")
  side = model_lib.image_size(bundle.config)
  pixels = [preprocess.preprocess(bundle.processor, image, labels, input_size=side).pixel_values
            for image, labels in (data.load_example(e) for e in examples)]
  encode = bundle.encoder_fn()
  encode(tf.constant(np.stack(pixels[:batch_size])))  # trace + warm-up
  t0 = time.perf_counter()
  for start in range(0, len(pixels), batch_size):
    encode(tf.constant(np.stack(pixels[start:start + batch_size]))).numpy()
  encoder_s = time.perf_counter() - t0
  n = len(examples)
  return records, {"images": n, "precompute_s": precompute_s,
                   "precompute_images_per_s": n / precompute_s,
                   "encoder_s": encoder_s, "encoder_s_per_image": encoder_s / n,
                   "encoder_images_per_s": n / encoder_s}


def write_client_manifests(manifest_dir: Path, records: Sequence["tff_sam.embeddings.Record"],
                           *, clients: int, per_client: int, prefix: str = "client"
                           ) -> list[str]:
  """Client k lists records [k * per_client, (k + 1) * per_client) (modulo the pool)."""
  from tff_sam import embeddings  # pylint: disable=g-import-not-at-top

  pool = list(records)
  assignment = {f"{prefix}_{k:03d}": [pool[(k * per_client + i) % len(pool)]
                                     for i in range(per_client)] for k in range(clients)}
  counts = embeddings.write_manifests(manifest_dir, assignment)
  empty = [c for c, n in counts.items() if n == 0]
  if empty:
    raise RuntimeError(f"clients without objects to train on: {empty}")
  return sorted(assignment)


# ------------------------------------------------------------------- memory

WORKER_BINARY = runtime.WORKER_BINARY


def _tree(pid: int) -> tuple[int, set[int]]:
  """(summed RSS in bytes, pids of its TFF workers) of a process and its descendants.

  (0, empty) once the process is gone.
  """
  import psutil  # pylint: disable=g-import-not-at-top

  try:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
  except psutil.Error:
    return 0, set()
  total, workers = 0, set()
  for p in procs:
    try:
      total += p.memory_info().rss
      if p.name() == WORKER_BINARY:
        workers.add(p.pid)
    except psutil.Error:
      pass
  return total, workers


def _end_tree(child: subprocess.Popen, timeout: float = 10.0) -> None:
  """Ends a child that is still running and every process under it.

  SIGTERM first (the child reaps its TFF worker itself), then SIGKILL for whatever
  is left, including a worker TFF restarted.
  """
  import psutil  # pylint: disable=g-import-not-at-top

  if child.poll() is not None:
    return
  try:
    tree = psutil.Process(child.pid).children(recursive=True)
  except psutil.Error:
    tree = []
  child.terminate()
  try:
    child.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    child.kill()
    child.wait()
  for p in tree:
    try:
      p.kill()
    except psutil.Error:
      pass


def measure_memory_run(spec: dict[str, Any], *, interval: float, work_dir: Path,
                       log: Callable[[str], None]) -> dict[str, Any]:
  """Runs `memory_child_main(spec)` in a fresh Python and samples its tree's RSS.

  If the child's TFF worker dies (out of memory) the child is ended and the run is
  reported with `failed` set; its peak is then a lower bound.

  Returns:
    The child's report plus `peak_rss_bytes` (whole run), `setup_peak_rss_bytes`
    (before the round started), `round_peak_rss_bytes` and `samples`.
  """
  work_dir.mkdir(parents=True, exist_ok=True)
  spec_path = work_dir / f"memory_{spec['name']}.json"
  result_path = work_dir / f"memory_{spec['name']}.result.json"
  result_path.unlink(missing_ok=True)
  fileio.write_json(spec_path, {**spec, "result_path": str(result_path)})
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env.setdefault("TRANSFORMERS_VERBOSITY", "error")
  code = "import sys; from tff_sam import benchmark; benchmark.memory_child_main(sys.argv[1])"
  samples, seen_workers, failed = [], set(), None
  with tempfile.TemporaryFile() as stderr:
    child = subprocess.Popen([sys.executable, "-c", code, str(spec_path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=stderr)
    try:
      while child.poll() is None:
        rss, workers = _tree(child.pid)
        samples.append((time.time(), rss))
        if seen_workers - workers and not result_path.exists() and child.poll() is None:
          failed = (f"{WORKER_BINARY} (pid {min(seen_workers - workers)}) died mid-round "
                    "(out of memory?)")
          break
        seen_workers |= workers
        time.sleep(interval)
    finally:
      _end_tree(child)
    stderr.seek(0)
    err = stderr.read().decode(errors="replace")
  if failed is None and (child.returncode != 0 or not result_path.exists()):
    tail = "\n".join(err.strip().splitlines()[-15:])
    raise RuntimeError(f"memory run {spec['name']} failed (exit {child.returncode}):\n{tail}")
  rss = [s for _, s in samples]
  if failed is not None:
    report = {"name": spec["name"], "clients": len(spec["clients"]),
              "participants": len(spec["participants"]), "failed": failed,
              "peak_rss_bytes": max(rss, default=0), "samples": len(samples)}
    log(f"  {spec['name']}: {failed}; peak RSS before that "
        f"{report['peak_rss_bytes'] / _GIB:.2f} GiB (a lower bound)")
    return report
  report = json.loads(result_path.read_text())
  start = report["round_start"]
  before = [s for t, s in samples if t < start] or [0]
  during = [s for t, s in samples if t >= start] or [0]
  report.update(peak_rss_bytes=max(rss, default=0), setup_peak_rss_bytes=max(before),
                round_peak_rss_bytes=max(during), samples=len(samples))
  log(f"  {spec['name']}: {len(spec['participants'])} of {len(spec['clients'])} clients: "
      f"peak RSS {report['peak_rss_bytes'] / _GIB:.2f} GiB (before the round "
      f"{report['setup_peak_rss_bytes'] / _GIB:.2f} GiB), round {report['round_s']:.1f} s")
  return report


def memory_child_main(spec_path: str) -> None:
  """The memory subprocess: one cached round over the spec's clients; writes a report.

  Holds only what a cached round needs (no image encoder): the process, its state
  (the decoder's initial weights) and the clients' datasets, streamed from the
  record files by TFF. The report is written before the TFF worker is ended.
  """
  from transformers import SamConfig  # pylint: disable=g-import-not-at-top

  from tff_sam import client_data  # pylint: disable=g-import-not-at-top
  from tff_sam import runtime  # pylint: disable=g-import-not-at-top

  spec = json.loads(Path(spec_path).read_text())
  t0 = time.time()
  with runtime.child_processes_reaped():
    runtime.configure_tff_execution(
        max_concurrent_computation_calls=spec["max_concurrent_computation_calls"],
        num_subrounds=spec.get("num_subrounds", 1))
    pipeline = client_data.PipelineSpec(**{**spec["pipeline"], "embedding_shape": tuple(
        spec["pipeline"]["embedding_shape"])})
    process = build_process(sam_config=SamConfig.from_dict(spec["sam_config"]), spec=pipeline,
                            client_ids=spec["clients"], client_lr=spec["client_lr"],
                            loop_implementation=spec["loop_implementation"])
    state = process.initialize()
    loop = TffLoop(process, state, spec["participants"])
    round_start = time.time()
    seconds = loop.step(1)
    fileio.write_json(spec["result_path"], {
        "name": spec["name"], "clients": len(spec["clients"]),
        "participants": len(spec["participants"]), "setup_s": round_start - t0,
        "round_s": seconds, "round_start": round_start, "examples": loop.examples[-1]})


def measure_memory(*, bundle: "tff_sam.model.SamBundle",
                   records: Sequence["tff_sam.embeddings.Record"], config: BenchConfig,
                   work_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
  """Peak RSS of a cached round: `memory_clients` vs `memory_base_clients` clients.

  Every client lists `examples_per_client` of the benchmark's cached records (the
  record files are shared on disk, so the clients' data is the same size and
  nothing is copied). Three fresh subprocesses: small (all participate), large (all
  participate) and the large population with `memory_base_clients` sampled.

  Raises:
    errors.UserError: The small run's TFF worker died (out of memory).
  """
  manifest_dir = work_dir / "memory_manifests"
  clients = write_client_manifests(manifest_dir, records, clients=config.memory_clients,
                                   per_client=config.examples_per_client, prefix="m")
  spec = pipeline_spec(bundle, manifest_dir, config, online=False)
  pipeline = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
  base = {"sam_config": bundle.config.to_dict(), "pipeline": pipeline,
          "client_lr": config.client_lr, "loop_implementation": config.loop_implementation,
          "max_concurrent_computation_calls": config.max_concurrent_computation_calls}
  rng = np.random.default_rng(config.seed)
  sampled = sorted(rng.choice(clients, size=config.memory_base_clients, replace=False).tolist())
  small = clients[:config.memory_base_clients]
  runs = {}
  subrounds = -(-config.memory_clients // config.memory_base_clients)
  for name, population, participants, num_subrounds in (
      ("small", small, small, 1), ("large", clients, clients, 1),
      ("large_sampled", clients, sampled, 1), ("large_subrounds", clients, clients, subrounds)):
    runs[name] = measure_memory_run(
        {**base, "name": name, "clients": population, "participants": participants,
         "num_subrounds": num_subrounds},
        interval=config.memory_interval, work_dir=work_dir / "memory", log=log)
  if "failed" in runs["small"]:
    raise errors.UserError(f"memory run with {config.memory_base_clients} clients: "
                           f"{runs['small']['failed']}")
  small_peak = runs["small"]["peak_rss_bytes"]
  return {
      "runs": runs,
      # A failed (out-of-memory) run's peak is a lower bound, and so is its ratio.
      "ratio_is_lower_bound": "failed" in runs["large"],
      "ratio": runs["large"]["peak_rss_bytes"] / small_peak,
      "ratio_sampled": runs["large_sampled"]["peak_rss_bytes"] / small_peak,
      "ratio_subrounds": runs["large_subrounds"]["peak_rss_bytes"] / small_peak,
      "subrounds": subrounds,
      "clients": config.memory_clients, "base_clients": config.memory_base_clients,
      "examples_per_client": config.examples_per_client,
      "records_shared_on_disk": True,
      "mode": "cached, one round; every client participates (large_sampled: "
              f"{config.memory_base_clients} of {config.memory_clients} sampled; "
              f"large_subrounds: all, in {subrounds} subrounds)",
      "subrounds_ratio_is_lower_bound": "failed" in runs["large_subrounds"],
  }


# ------------------------------------------------------------------- the benchmark


def _goals(result: dict[str, Any], config: BenchConfig) -> dict[str, dict[str, Any]]:
  applicable = {
      "cache_speedup": config.arch == "vit_b",
      "tff_overhead": True,
      "memory_ratio_64_vs_4": (config.memory_clients, config.memory_base_clients) == (64, 4),
  }
  applicable["memory_ratio_64_vs_4_subrounds"] = applicable["memory_ratio_64_vs_4"]
  out = {}
  for key, op, threshold in GOALS:
    value = result[key]
    met = value >= threshold if op == ">=" else value <= threshold
    out[key] = {"value": value, "goal": f"{op} {threshold:g}", "threshold": threshold,
                "met": bool(met), "applicable": applicable[key]}
  return out


def _mobile_sam_throughput(*, examples: Sequence["tff_sam.data.Example"],
                           config: BenchConfig, work_dir: Path, cache_dir: Optional[Path],
                           log: Callable[[str], None]) -> dict[str, Any]:
  """Precompute and cached-round throughput of MobileSAM, or why it was skipped."""
  from tff_sam import federated  # pylint: disable=g-import-not-at-top
  from tff_sam import model as model_lib  # pylint: disable=g-import-not-at-top

  try:
    bundle = model_lib.load_sam(model_lib.MOBILE_SAM, cache_dir=cache_dir)
  except errors.UserError as e:
    log(f"  mobile_sam: skipped ({e})")
    return {"skipped": str(e)}
  records, pre = precompute(bundle, examples, cache_root=work_dir / "cache",
                            batch_size=config.encode_batch_size)
  log(f"  mobile_sam precompute: {pre['images']} images in {pre['precompute_s']:.1f} s; "
      f"encoder {pre['encoder_s_per_image']:.3f} s/image")
  clients = write_client_manifests(work_dir / "mobile_sam_manifests", records,
                                   clients=config.clients, per_client=config.examples_per_client)
  spec = pipeline_spec(bundle, work_dir / "mobile_sam_manifests", config, online=False)
  process = build_process(sam_config=bundle.config, spec=spec, client_ids=clients,
                          client_lr=config.client_lr,
                          loop_implementation=config.loop_implementation)
  local = model_lib.build_prompt_mask_decoder(bundle)
  state = federated.initial_state(process, *model_lib.model_weights_lists(local))
  timed = time_loops({"mobile_sam cached TFF": TffLoop(process, state, clients)},
                     config.rounds, log)["mobile_sam cached TFF"]
  examples_per_round = timed["examples_per_round"]
  return {"model": bundle.name, "precompute": pre, "cached_round": timed,
          "decoder_examples_per_s": examples_per_round / timed["mean_s"],
          "decoder_prompts_per_s": examples_per_round * config.prompts_per_image / timed["mean_s"],
          "precompute_images_per_s": pre["precompute_images_per_s"],
          "encoder_images_per_s": pre["encoder_images_per_s"],
          "parameters": parameter_counts(bundle)}


def run_benchmark(config: BenchConfig, *, log: Callable[[str], None] = print
                  ) -> dict[str, Any]:
  """Runs every section, prints progress, writes `output_dir/bench.json`.

  Args:
    config: The settings (validated here).
    log: Where progress lines go.

  Returns:
    The result (also written to `bench.json`).

  Raises:
    errors.UserError: A bad setting, `arch=mobile_sam` without its weights, or
      TFF's worker killed (out of memory).
  """
  import shutil  # pylint: disable=g-import-not-at-top

  config.validate()
  start = time.perf_counter()
  out = Path(config.output_dir).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  work = out / "work"
  shutil.rmtree(work, ignore_errors=True)
  machine = machine_info()
  log(f"machine: {machine['cpu']}, {machine['cores']} cores, "
      f"{(machine['ram_bytes'] or 0) / _GIB:.1f} GiB RAM")
  progress = {"section": "setup"}
  try:
    with runtime.worker_watched(progress):
      result = _run_sections(config, work=work, machine=machine, progress=progress, log=log)
  finally:
    if not config.keep_work:
      shutil.rmtree(work, ignore_errors=True)
  result["timings"]["total_s"] = time.perf_counter() - start
  fileio.write_json(out / BENCH_JSON, result)
  log("")
  log(format_table(result))
  log(f"\nwritten: {out / BENCH_JSON}")
  return result


def _run_sections(config: BenchConfig, *, work: Path, machine: dict[str, Any],
                  progress: dict[str, str], log: Callable[[str], None]) -> dict[str, Any]:
  """The sections of `run_benchmark`; `progress["section"]` names the current one."""
  from tff_sam import embeddings  # pylint: disable=g-import-not-at-top
  from tff_sam import federated  # pylint: disable=g-import-not-at-top
  from tff_sam import model as model_lib  # pylint: disable=g-import-not-at-top

  cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else None
  timings: dict[str, Any] = {}
  t0 = time.perf_counter()
  bundle = load_bundle(config.arch, cache_dir=cache_dir)
  timings["load_model_s"] = time.perf_counter() - t0
  params = parameter_counts(bundle)
  if config.arch == "vit_b" and params["total"] != VIT_B_PARAMETERS:
    raise RuntimeError(f"ViT-B has {params['total']} weights, expected {VIT_B_PARAMETERS}")
  log(f"model: {bundle.name}: {params['total'] / 1e6:.2f} M parameters (image encoder "
      f"{params['image_encoder'] / 1e6:.2f} M, prompt encoder + decoder "
      f"{params['prompt_decoder'] / 1e6:.3f} M, trainable {params['trainable'] / 1e6:.3f} M)")

  n = config.clients * config.examples_per_client
  examples = write_examples(work / "data", count=n, size=config.image_size, seed=config.seed)

  # ---- precompute (cached mode) and image records (online mode)
  progress["section"] = "the embedding precompute"
  log(f"[1/5] embedding precompute: {n} images ({config.clients} clients x "
      f"{config.examples_per_client})")
  records, pre = precompute(bundle, examples, cache_root=work / "cache",
                            batch_size=config.encode_batch_size)
  log(f"  {pre['precompute_s']:.1f} s end to end ({pre['precompute_images_per_s']:.3f} "
      f"images/s); encoder alone {pre['encoder_s_per_image']:.3f} s/image")
  t0 = time.perf_counter()
  image_records, _ = embeddings.build_records(
      examples, bundle=bundle, cache_root=work / "cache", binary_components=False,
      batch_size=config.encode_batch_size, show_progress=False, online=True)
  timings["online_records_s"] = time.perf_counter() - t0
  timings["precompute"] = pre

  # ---- the processes (as the program builds them)
  progress["section"] = "building the processes"
  clients = write_client_manifests(work / "manifests", records, clients=config.clients,
                                   per_client=config.examples_per_client)
  if write_client_manifests(work / "online_manifests", image_records, clients=config.clients,
                            per_client=config.examples_per_client) != clients:
    raise RuntimeError("online and cached clients differ")
  build = dict(sam_config=bundle.config, client_ids=clients, client_lr=config.client_lr,
               loop_implementation=config.loop_implementation)
  t0 = time.perf_counter()
  cached_spec = pipeline_spec(bundle, work / "manifests", config, online=False)
  cached_process = build_process(spec=cached_spec, **build)
  decoder_weights = model_lib.model_weights_lists(model_lib.build_prompt_mask_decoder(bundle))
  loops = {"cached TFF": TffLoop(
      cached_process, federated.initial_state(cached_process, *decoder_weights), clients)}
  timings["build_cached_process_s"] = time.perf_counter() - t0
  loops["plain tf.function"] = PlainLoop(bundle=bundle, spec=cached_spec, clients=clients,
                                         client_lr=config.client_lr)
  other = compared_loop(config.loop_implementation)
  other_process = build_process(spec=cached_spec, **{**build, "loop_implementation": other})
  loops[f"cached TFF, {other}"] = TffLoop(
      other_process, federated.initial_state(other_process, *decoder_weights), clients)
  t0 = time.perf_counter()
  online_process = build_process(
      spec=pipeline_spec(bundle, work / "online_manifests", config, online=True),
      online_encoder=model_lib.encoder_kind(bundle), **build)
  online_model = model_lib.build_online_model(bundle)
  online_state = federated.initial_state(online_process,
                                         *model_lib.model_weights_lists(online_model))
  del online_model
  loops["online TFF"] = TffLoop(online_process, online_state, clients)
  del online_state
  gc.collect()
  timings["build_online_process_s"] = time.perf_counter() - t0
  log(f"  processes built: cached {timings['build_cached_process_s']:.1f} s, online "
      f"{timings['build_online_process_s']:.1f} s (client loop: {config.loop_implementation})")

  # ---- 4. communication, from the processes' type signatures
  comm = bytes_per_client_round(cached=communication(cached_process),
                                online=communication(online_process), parameters=params)
  if comm["cached"]["upload_update"] != 4 * params["trainable"]:
    raise RuntimeError("the update type does not match the trainable weights")
  del cached_process, online_process

  # ---- 1 + 2: rounds, interleaved
  progress["section"] = "the federated rounds (the online round is the largest)"
  log(f"[1-2/5] federated rounds: {config.clients} clients x {config.examples_per_client} "
      f"images, batch {config.batch_size}, {config.prompts_per_image} prompts/image; "
      f"1 warm-up + {config.rounds} timed rounds each, interleaved")
  rounds = time_loops(loops, config.rounds, log)
  del loops
  gc.collect()
  cached, online, plain = rounds["cached TFF"], rounds["online TFF"], rounds["plain tf.function"]
  if len({r["examples_per_round"] for r in rounds.values()}) != 1:
    raise RuntimeError(f"the loops trained on different numbers of examples: "
                       f"{ {k: r['examples_per_round'] for k, r in rounds.items()} }")
  timings["rounds"] = rounds
  saved = online["mean_s"] - cached["mean_s"]
  compared = rounds[f"cached TFF, {other}"]

  # ---- 3. memory
  progress["section"] = "the memory runs"
  log(f"[3/5] memory: fresh subprocesses, one cached round, {config.memory_clients} vs "
      f"{config.memory_base_clients} clients x {config.examples_per_client} images")
  memory = measure_memory(bundle=bundle, records=records, config=config, work_dir=work,
                          log=log)
  timings["memory"] = {k: {"setup_s": v.get("setup_s"), "round_s": v.get("round_s")}
                       for k, v in memory["runs"].items()}

  # ---- 5. throughput
  progress["section"] = "the throughput section"
  examples_per_round = cached["examples_per_round"]
  throughput = {config.arch: {
      "model": bundle.name,
      "decoder_examples_per_s": examples_per_round / cached["mean_s"],
      "decoder_prompts_per_s": examples_per_round * config.prompts_per_image / cached["mean_s"],
      "decoder_examples_per_s_plain": examples_per_round / plain["mean_s"],
      "online_examples_per_s": examples_per_round / online["mean_s"],
      "precompute_images_per_s": pre["precompute_images_per_s"],
      "encoder_images_per_s": pre["encoder_images_per_s"],
  }}
  if config.arch != model_lib.MOBILE_SAM:
    if config.mobile_sam:
      log("[5/5] throughput: mobile_sam")
      mobile = _mobile_sam_throughput(examples=examples, config=config, work_dir=work,
                                      cache_dir=cache_dir, log=log)
      if "cached_round" in mobile:
        timings["mobile_sam"] = {"precompute": mobile.pop("precompute"),
                                 "cached_round": mobile.pop("cached_round")}
      throughput[model_lib.MOBILE_SAM] = mobile
    else:
      throughput[model_lib.MOBILE_SAM] = {"skipped": "--nomobile_sam"}

  result = {
      "cache_speedup": online["mean_s"] / cached["mean_s"],
      "tff_overhead": cached["mean_s"] / plain["mean_s"],
      "memory_ratio_64_vs_4": memory["ratio"],
      "memory_ratio_64_vs_4_subrounds": memory["ratio_subrounds"],
      "bytes_per_client_round": comm,
      "cache": {"online_round_s": online["mean_s"], "cached_round_s": cached["mean_s"],
                "precompute_s": pre["precompute_s"],
                "break_even_rounds": pre["precompute_s"] / saved if saved > 0 else None},
      "overhead": {
          "tff_round_s": cached["mean_s"], "plain_round_s": plain["mean_s"],
          "loop_implementation": config.loop_implementation,
          "compared": {"loop_implementation": other, "tff_round_s": compared["mean_s"],
                       "tff_overhead": compared["mean_s"] / plain["mean_s"]}},
      "memory": memory,
      "throughput": throughput,
      "timings": timings,
      "machine": machine,
      "config": config.to_dict(),
      "model": {"name": bundle.name, "parameters": params},
  }
  result["goals"] = _goals(result, config)
  return result


# ------------------------------------------------------------------- the table


def _mb(value: float) -> str:
  return f"{value / _MB:,.2f} MB"


def format_table(result: dict[str, Any]) -> str:
  """The human-readable summary of a `run_benchmark` result."""
  cfg, goals = result["config"], result["goals"]
  params = result["model"]["parameters"]
  rows: list[tuple[str, str, str]] = []

  def goal(key: str) -> str:
    g = goals[key]
    verdict = "met" if g["met"] else "NOT met"
    return f"goal {g['goal']}: {verdict}" + ("" if g["applicable"] else " (n/a at these sizes)")

  cache = result["cache"]
  rows.append(("1 cache speed-up (per round)", f"{result['cache_speedup']:.1f}x  online "
               f"{cache['online_round_s']:.2f} s vs cached {cache['cached_round_s']:.3f} s",
               goal("cache_speedup")))
  pre = result["timings"]["precompute"]
  break_even = cache["break_even_rounds"]
  rows.append(("  embedding precompute", f"{pre['precompute_s']:.1f} s for {pre['images']} "
               f"images; encoder {pre['encoder_s_per_image']:.3f} s/image",
               "" if break_even is None else f"repaid after {break_even:.2f} rounds"))
  ov = result["overhead"]
  rows.append(("2 TFF overhead (TFF / plain)", f"{result['tff_overhead']:.2f}x  TFF "
               f"{ov['tff_round_s']:.3f} s vs tf.function {ov['plain_round_s']:.3f} s",
               goal("tff_overhead")))
  other = ov["compared"]
  rows.append((f"  TFF with the {other['loop_implementation']} loop",
               f"{other['tff_overhead']:.2f}x  TFF {other['tff_round_s']:.3f} s",
               f"(the run's loop: {ov['loop_implementation']})"))
  mem = result["memory"]
  runs = mem["runs"]
  bound = ">= " if mem.get("ratio_is_lower_bound") else ""
  rows.append((f"3 memory {mem['clients']} vs {mem['base_clients']} clients",
               f"{bound}{mem['ratio']:.2f}x  peak RSS {runs['large']['peak_rss_bytes'] / _GIB:.2f}"
               f" vs {runs['small']['peak_rss_bytes'] / _GIB:.2f} GiB",
               goal("memory_ratio_64_vs_4") + (f"; {runs['large']['failed']}"
                                              if "failed" in runs["large"] else "")))
  rows.append((f"  {mem['base_clients']} of {mem['clients']} sampled",
               f"{mem['ratio_sampled']:.2f}x  peak RSS "
               f"{runs['large_sampled']['peak_rss_bytes'] / _GIB:.2f} GiB",
               runs["large_sampled"].get("failed", "")))
  sub = runs["large_subrounds"]
  rows.append((f"  all {mem['clients']} in {mem['subrounds']} subrounds",
               f"{'>= ' if 'failed' in sub else ''}{mem['ratio_subrounds']:.2f}x  peak RSS "
               f"{sub['peak_rss_bytes'] / _GIB:.2f} GiB",
               goal("memory_ratio_64_vs_4_subrounds") + (f"; {sub['failed']}"
                                                        if "failed" in sub else "")))
  comm = result["bytes_per_client_round"]
  for key, label in (("cached", "cached (decoder only)"), ("online", "online (encoder too)"),
                     ("full_model", "full-model fine-tuning")):
    c = comm[key]
    rows.append((f"4 bytes/client/round, {label}" if key == "cached" else f"  {label}",
                 f"down {_mb(c['broadcast'])}, up {_mb(c['upload'])}", ""))
  for arch, t in result["throughput"].items():
    if "skipped" in t:
      rows.append((f"5 throughput, {arch}", "skipped", t["skipped"][:70]))
      continue
    rows.append((f"5 throughput, {arch}",
                 f"decoder {t['decoder_examples_per_s']:.2f} images/s "
                 f"({t['decoder_prompts_per_s']:.1f} prompts/s) in TFF",
                 f"precompute {t['precompute_images_per_s']:.3f} images/s "
                 f"(encoder alone {t['encoder_images_per_s']:.3f})"))
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  head = (f"tff_sam benchmark: {result['model']['name']}, {params['total'] / 1e6:.1f} M "
          f"parameters; {cfg['clients']} clients x {cfg['examples_per_client']} images, "
          f"batch {cfg['batch_size']}, mean of {cfg['rounds']} timed rounds; client loop "
          f"{cfg['loop_implementation']}\n"
          f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores")
  lines = [head, "-" * (sum(widths) + 4)]
  lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows]
  return "\n".join(lines)
