"""The model aggregator: weighted mean with robust zeroing and clipping.

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
from typing import Any, Optional

import tensorflow as tf
import tensorflow_federated as tff


# Adaptation rates and starting points of `tff.learning.robust_aggregator`.
ZEROING_INITIAL = 10.0
ZEROING_RATE = math.log(10.0)
ZEROING_INCREMENT = 1.0
CLIPPING_RATE = 0.2


class NonFiniteCounting(tff.aggregators.WeightedAggregationFactory):
  """Wraps a weighted aggregation factory; adds the count of zero-weight clients.

  TFF's client work gives a client whose update holds NaN/Inf the weight 0 (and a
  zero update); every client of this project trains on at least one example, so a
  zero weight means exactly that. The measurements become
  `{"robust": <inner's>, "nonfinite_clients": <count>}`.
  """

  def __init__(self, inner: tff.aggregators.WeightedAggregationFactory):
    self._inner = inner

  def create(self, value_type, weight_type):
    inner_process = self._inner.create(value_type, weight_type)

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
  return NonFiniteCounting(factory)


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
