"""The TFF processes: weighted FedAvg over the prompt encoder + mask decoder, and
federated evaluation.

`model_fn` builds the architecture from the SAM config only (TFF calls it several
times while building the process); pretrained weights go into the initial state with
`process.set_model_weights`. Only the mask decoder is trainable, so only its weights
are updated and aggregated; the frozen prompt encoder's few non-trainable weights are
broadcast with them.

Robust aggregation (`build_model_aggregator`, on by default) protects the global
model from bad clients, in three layers, outermost first:

1. non-finite updates: TFF's client work already replaces an update holding NaN/Inf
   by zeros with weight 0; this layer only counts such clients (`nonfinite_clients`);
2. zeroing (`tff.aggregators.zeroing_factory`): an update whose largest absolute
   value exceeds an adaptive threshold (`multiplier` x the estimated `quantile` of
   clients' max-abs values, + 1) is replaced by zeros (`zeroed_clients`);
3. clipping (`tff.aggregators.clipping_factory`): updates are scaled down to an
   adaptive L2 norm that tracks the `quantile` of clients' norms (`clipped_clients`),
   bounding any single client's influence.

The thresholds adapt with TFF's no-noise `PrivateQuantileEstimationProcess`, as in
`tff.learning.robust_aggregator` (whose rates this module keeps).
"""

import collections
import math
from typing import Any, Callable, Optional

import tensorflow as tf

from tff_sam import losses
from tff_sam import model as model_lib


def build_model_fn(*, sam_config, input_spec, prompt: str, loss: str,
                   train_iou_head: bool, online_encoder: Optional[str] = None
                   ) -> Callable[[], object]:
  """Returns a no-argument function building a fresh `tff.learning` model.

  Args:
    sam_config: The `SamConfig` (architecture only; weights are set later).
    input_spec: Element spec of a client dataset (`OrderedDict(x=..., y=...)`).
    prompt: Prompt mode of the model (`box`, `points`, `both`).
    loss: Loss name (see `losses`).
    train_iou_head: Train the IoU head with an MSE term, or freeze it.
    online_encoder: None: the model reads cached embeddings (`PromptMaskDecoder`).
      `vit` or `tinyvit`: online mode, the model holds that frozen image encoder
      and reads pixel values (`model.OnlineSamModel`).
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  def model_fn():
    if online_encoder:
      keras_model = model_lib.OnlineSamModel(
          sam_config, encoder=online_encoder, prompt=prompt, train_iou_head=train_iou_head)
    else:
      keras_model = model_lib.PromptMaskDecoder(
          sam_config, prompt=prompt, train_iou_head=train_iou_head)
    return tff.learning.models.from_keras_model(
        keras_model,
        loss=losses.MaskLoss(loss, iou_weight=1.0 if train_iou_head else 0.0),
        input_spec=input_spec,
        metrics=[losses.MeanDice()])

  return model_fn


def build_optimizer(name: str, learning_rate: float):
  """A `tff.learning.optimizers` optimizer: `sgd` (plain, no momentum) or `adam`."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  if name == "sgd":
    return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate)
  if name == "adam":
    return tff.learning.optimizers.build_adam(learning_rate=learning_rate)
  raise ValueError(f"unknown optimizer {name!r}")


# Adaptation rates and starting points of `tff.learning.robust_aggregator`.
ZEROING_INITIAL = 10.0
ZEROING_RATE = math.log(10.0)
ZEROING_INCREMENT = 1.0
CLIPPING_RATE = 0.2


def _count_nonfinite(inner):
  """Wraps a weighted aggregation factory; adds the count of zero-weight clients.

  TFF's client work gives a client whose update holds NaN/Inf the weight 0 (and a
  zero update); every client of this project trains on at least one example, so a
  zero weight means exactly that.
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  class CountNonFinite(tff.aggregators.WeightedAggregationFactory):
    """Adds `nonfinite_clients` to the measurements of `inner`."""

    def create(self, value_type, weight_type):
      inner_process = inner.create(value_type, weight_type)

      @tff.tensorflow.computation(weight_type)
      def is_zero(weight):
        return tf.cast(tf.equal(weight, 0.0), tf.int32)

      @tff.federated_computation()
      def init_fn():
        return inner_process.initialize()

      @tff.federated_computation(init_fn.type_signature.result,
                                 tff.FederatedType(value_type, tff.CLIENTS),
                                 tff.FederatedType(weight_type, tff.CLIENTS))
      def next_fn(state, value, weight):
        output = inner_process.next(state, value, weight)
        count = tff.federated_sum(tff.federated_map(is_zero, weight))
        measurements = tff.federated_zip(collections.OrderedDict(
            robust=output.measurements, nonfinite_clients=count))
        return tff.templates.MeasuredProcessOutput(
            state=output.state, result=output.result, measurements=measurements)

      return tff.templates.AggregationProcess(init_fn, next_fn)

  return CountNonFinite()


def build_model_aggregator(*, zeroing: bool = True, zeroing_quantile: float = 0.98,
                           zeroing_multiplier: float = 2.0, clipping: bool = True,
                           clipping_quantile: float = 0.8,
                           clipping_initial_norm: float = 1.0):
  """The weighted-mean model aggregator with robust zeroing and clipping.

  Args:
    zeroing: Zero out updates with an extreme max-abs value.
    zeroing_quantile: Quantile of clients' max-abs values the threshold tracks.
    zeroing_multiplier: Threshold = multiplier x that quantile + 1.
    clipping: Clip updates to an adaptive L2 norm.
    clipping_quantile: Quantile of clients' L2 norms the clipping norm tracks.
    clipping_initial_norm: Starting clipping norm.

  Returns:
    A `tff.aggregators.WeightedAggregationFactory` (see the module docstring).
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  estimate = tff.aggregators.PrivateQuantileEstimationProcess.no_noise
  factory = tff.aggregators.MeanFactory()
  if clipping:
    factory = tff.aggregators.clipping_factory(
        estimate(initial_estimate=clipping_initial_norm, target_quantile=clipping_quantile,
                 learning_rate=CLIPPING_RATE),
        factory)
  if zeroing:
    factory = tff.aggregators.zeroing_factory(
        estimate(initial_estimate=ZEROING_INITIAL, target_quantile=zeroing_quantile,
                 learning_rate=ZEROING_RATE, multiplier=zeroing_multiplier,
                 increment=ZEROING_INCREMENT),
        factory)
  return _count_nonfinite(factory)


AGGREGATION_METRICS = ("nonfinite_clients", "zeroed_clients", "clipped_clients",
                       "zeroing_norm", "clipping_norm")


def aggregation_metrics(measurements: Any) -> dict[str, Optional[float]]:
  """Flat per-round counts from the `aggregator` measurements of the process.

  Args:
    measurements: `result.metrics["aggregator"]` of a round of a process built with
      `build_model_aggregator`.

  Returns:
    `AGGREGATION_METRICS` -> value; None for a disabled layer.
  """
  out = dict.fromkeys(AGGREGATION_METRICS)
  out["nonfinite_clients"] = int(measurements["nonfinite_clients"])
  level = measurements["robust"]
  if "zeroed_count" in level:
    out["zeroed_clients"] = int(level["zeroed_count"])
    out["zeroing_norm"] = float(level["zeroing_norm"])
    level = level["zeroing"]
  if "clipped_count" in level:
    out["clipped_clients"] = int(level["clipped_count"])
    out["clipping_norm"] = float(level["clipping_norm"])
  return out


def build_training_process(*, model_fn, client_lr: float, server_optimizer: str,
                           server_lr: float, model_aggregator=None,
                           loop_implementation: str = "dataset_iterator"):
  """Weighted FedAvg (`tff.learning.algorithms.build_weighted_fed_avg`).

  Clients run Adam at `client_lr` for their local epochs; the server applies the
  example-weighted mean update with `server_optimizer` at `server_lr`. The client loop
  iterates the dataset (`LoopImplementation.DATASET_ITERATOR`): TFF's default
  `dataset.reduce` loop measured several times slower per round and, in online mode at
  ViT-B size, about twice the worker memory (BENCHMARKS.md).

  Args:
    model_fn: See `build_model_fn`.
    client_lr: Client Adam learning rate.
    server_optimizer: `sgd` or `adam`.
    server_lr: Server learning rate.
    model_aggregator: Aggregation factory (default `build_model_aggregator()`).
    loop_implementation: The client loop, a `tff.learning.LoopImplementation` name
      in lower case (`dataset_iterator`, or TFF's default `dataset_reduce`, which the
      benchmark compares against).
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  return tff.learning.algorithms.build_weighted_fed_avg(
      model_fn,
      client_optimizer_fn=build_optimizer("adam", client_lr),
      server_optimizer_fn=build_optimizer(server_optimizer, server_lr),
      model_aggregator=model_aggregator or build_model_aggregator(),
      loop_implementation=tff.learning.LoopImplementation[loop_implementation.upper()])


def build_evaluation_process(*, model_fn):
  """Federated evaluation (`tff.learning.algorithms.build_fed_eval`) of `model_fn`."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  return tff.learning.algorithms.build_fed_eval(
      model_fn, loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR)


def evaluation_metrics(result) -> dict[str, float]:
  """`loss`, `dice` and `num_examples` of a federated evaluation round's output."""
  m = result.metrics["client_work"]["eval"]["current_round_metrics"]
  return {"loss": float(m["loss"]), "dice": float(m["dice"]),
          "num_examples": int(m["num_examples"])}


def compose_with_client_data(process, client_data):
  """A process whose `next` takes client ids and builds their datasets in TFF."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  return tff.simulation.compose_dataset_computation_with_learning_process(
      client_data.dataset_computation, process)


def with_model_weights(process, state, source_process, source_state):
  """`state` of `process` carrying the global model of `source_state`."""
  return process.set_model_weights(state, source_process.get_model_weights(source_state))


def initial_state(process, trainable, non_trainable):
  """The process's initial state carrying the given (pretrained) model weights."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  state = process.initialize()
  return process.set_model_weights(
      state, tff.learning.models.ModelWeights(trainable=list(trainable),
                                              non_trainable=list(non_trainable)))


def weights_from_state(process, state) -> tuple[list, list]:
  """(trainable, non_trainable) numpy weights of the global model in `state`."""
  w = process.get_model_weights(state)
  return [tf.convert_to_tensor(v).numpy() for v in w.trainable], [
      tf.convert_to_tensor(v).numpy() for v in w.non_trainable]
