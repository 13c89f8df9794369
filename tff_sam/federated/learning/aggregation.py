"""The model aggregator: mean with robust zeroing and clipping, and what the wire sees.

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

Inside the mean, the sum over clients is one of (`build_model_aggregator`):

* plain (TFF's `SumFactory`);
* `secure_aggregation`: TFF's `SecureSumFactory` (`federated_secure_sum_bitwidth`),
  as `tff.learning.secure_aggregator` composes it: each weighted value clipped to
  an adaptive per-coordinate bound (the 95th percentile of clients' max-abs values,
  x2, estimated through secure sums too) and quantized to 32-bit integers; the
  example weights to [0, 2^20 - 1]; the robust layers' counts and quantile estimates
  go through secure sums as well;
* `update_compression="int8"` (or `int4`): TFF's
  `EncodedSumFactory.quantize_above_threshold` (`tff.learning.compression_aggregator`'s
  encoder), here on every tensor: each client's weighted update is uniformly
  quantized to 8 (4) bits between its min and max, with stochastic rounding, and
  bit-packed into int32 words, 28 bits of each word used: 8-bit values cost 1.14
  bytes, 4-bit values 0.57 (`BENCHMARKS.md`);
* with differential privacy (`dp_factory`, `tff_sam.federated.learning.privacy`): TFF's
  `DifferentiallyPrivateFactory`, an unweighted mean of clipped updates plus Gaussian
  noise, which replaces the clipping layer (it clips itself); zeroing stays outside
  it, as in `tff.learning.dp_aggregator`.
"""

import collections
import functools
import logging
import math
from typing import Any, Optional

import tensorflow as tf
import tensorflow_federated as tff

from tff_sam import config as config_lib


# Adaptation rates and starting points of `tff.learning.robust_aggregator`.
ZEROING_INITIAL = 10.0
ZEROING_RATE = math.log(10.0)
ZEROING_INCREMENT = 1.0
CLIPPING_RATE = 0.2
# `tff.learning.secure_aggregator`'s bounds: the per-coordinate bound's estimate and the
# largest example weight a client may send through the secure sum.
SECURE_BOUND_INITIAL = 50.0
SECURE_BOUND_QUANTILE = 0.95
SECURE_BOUND_RATE = 1.0
SECURE_BOUND_MULTIPLIER = 2.0
SECURE_MAX_WEIGHT = float(2**20 - 1)
# Tensors of at most this many values are sent unquantized (TFF's compression
# aggregator uses 20,000; 0 quantizes every tensor of the update).
QUANTIZATION_THRESHOLD = 0


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


class _DropMessages(logging.Filter):
  """Drops log records whose message contains all of `parts`."""

  def __init__(self, *parts: str):
    super().__init__()
    self.parts = parts

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not all(part in message for part in self.parts)


# Known noise of TFF's aggregators, logged while their processes are built:
# TensorFlow's "Object was never used" stack trace for every bound check of a secure
# sum (the checks run; the wrapped assert ops are collected unused), over a hundred
# lines per process; and tensor_encoding's bit-packing warning, once per tensor.
_UNUSED_ASSERTS = ("tensorflow", _DropMessages("Object was never used", "assert_"))
_BITPACKING = ("", _DropMessages("consider different bitpacking method"))


def _quiet(logger_name: str, drop: logging.Filter) -> None:
  logger = logging.getLogger(logger_name)
  if drop not in logger.filters:
    logger.addFilter(drop)


def _mean(*, secure_aggregation: bool, update_compression: str, estimate):
  """The weighted mean with the sum of the module docstring."""
  if secure_aggregation:
    _quiet(*_UNUSED_ASSERTS)
    bound = estimate(initial_estimate=SECURE_BOUND_INITIAL,
                     target_quantile=SECURE_BOUND_QUANTILE, learning_rate=SECURE_BOUND_RATE,
                     multiplier=SECURE_BOUND_MULTIPLIER)
    return tff.aggregators.MeanFactory(
        value_sum_factory=tff.aggregators.SecureSumFactory(bound),
        weight_sum_factory=tff.aggregators.SecureSumFactory(
            upper_bound_threshold=SECURE_MAX_WEIGHT, lower_bound_threshold=0.0))
  if update_compression in config_lib.QUANTIZATION_BITS:
    _quiet(*_BITPACKING)
    return tff.aggregators.MeanFactory(
        value_sum_factory=tff.aggregators.EncodedSumFactory.quantize_above_threshold(
            quantization_bits=config_lib.QUANTIZATION_BITS[update_compression],
            threshold=QUANTIZATION_THRESHOLD))
  if update_compression != "none":
    raise ValueError(f"unknown update compression {update_compression!r}")
  return tff.aggregators.MeanFactory()


def build_model_aggregator(*, zeroing: bool = True, zeroing_quantile: float = 0.98,
                           zeroing_multiplier: float = 2.0, clipping: bool = True,
                           clipping_quantile: float = 0.8,
                           clipping_initial_norm: float = 1.0,
                           secure_aggregation: bool = False, update_compression: str = "none",
                           dp_factory: Optional[tff.aggregators.UnweightedAggregationFactory] = None):
  """The model aggregator with robust zeroing and clipping (module docstring).

  Args:
    zeroing: Zero out updates with an extreme max-abs value.
    zeroing_quantile: Quantile of clients' max-abs values the threshold tracks.
    zeroing_multiplier: Threshold = multiplier x that quantile + 1.
    clipping: Clip updates to an adaptive L2 norm (without `dp_factory`).
    clipping_quantile: Quantile of clients' L2 norms the clipping norm tracks.
    clipping_initial_norm: Starting clipping norm.
    secure_aggregation: Sum through TFF's secure sum (counts and estimates too).
    update_compression: `none`, `int8` or `int4`.
    dp_factory: A differentially private (unweighted) mean, which replaces the
      clipping layer and the mean (`privacy.build_dp_factory`).

  Returns:
    A `tff.aggregators.WeightedAggregationFactory`, or an unweighted one with
    `dp_factory` (FedAvg is then unweighted: every client counts once).
  """
  estimate = functools.partial(tff.aggregators.PrivateQuantileEstimationProcess.no_noise,
                               secure_estimation=secure_aggregation)
  count_sum = ({"upper_bound_threshold": 1, "lower_bound_threshold": 0}
               if secure_aggregation else None)

  def counted(layer, *args):
    if count_sum is None:
      return layer(*args)
    name = ("zeroed_count_sum_factory" if layer is tff.aggregators.zeroing_factory
            else "clipped_count_sum_factory")
    return layer(*args, **{name: tff.aggregators.SecureSumFactory(**count_sum)})

  if dp_factory is not None:
    factory = dp_factory
  else:
    factory = _mean(secure_aggregation=secure_aggregation,
                    update_compression=update_compression, estimate=estimate)
    if clipping:
      factory = counted(tff.aggregators.clipping_factory, estimate(
          initial_estimate=clipping_initial_norm, target_quantile=clipping_quantile,
          learning_rate=CLIPPING_RATE), factory)
  if zeroing:
    factory = counted(tff.aggregators.zeroing_factory, estimate(
        initial_estimate=ZEROING_INITIAL, target_quantile=zeroing_quantile,
        learning_rate=ZEROING_RATE, multiplier=zeroing_multiplier,
        increment=ZEROING_INCREMENT), factory)
  if dp_factory is not None:
    return factory
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
  level = measurements
  if "nonfinite_clients" in measurements:  # Weighted (no DP): `NonFiniteCounting`.
    out["nonfinite_clients"] = int(measurements["nonfinite_clients"])
    level = measurements["robust"]
  if "zeroed_count" in level:
    out["zeroed_clients"] = int(level["zeroed_count"])
    out["zeroing_norm"] = float(level["zeroing_norm"])
    level = level["zeroing"]
  if "clipped_count" in level:
    out["clipped_clients"] = int(level["clipped_count"])
    out["clipping_norm"] = float(level["clipping_norm"])
  if "dp_query_metrics" in level:  # The DP mean: its (fixed or adaptive) clipping norm.
    query = level["dp_query_metrics"]
    if "clip" in query:
      out["clipping_norm"] = float(query["clip"])
  return out
