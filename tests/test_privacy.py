"""Privacy and communication: DP-FedAvg and its epsilon, secure aggregation, compressed
updates, FedProx.

TFF aggregation processes on toy updates (the noise's variance over many rounds, the
secure and compressed sums against the plain one), bytes from the type signatures of
the program's processes, then the program's own processes on the tiny reference data.
"""

import csv
import gc
import logging
import math

import dp_accounting
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam.bench import communication
from tff_sam.data import pipeline
from tff_sam.federated.backends import execution
from tff_sam.federated.learning import aggregation
from tff_sam.federated.learning import privacy
from tff_sam.federated.learning import tasks
from tff_sam.federated.program import program

from conftest import CROSS_RUNTIME_RTOL
from conftest import cache_clients
from conftest import cpp_execution


def _max_abs(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)))


# ---------------------------------------------------------------- differential privacy


def test_dp_noise_is_added_with_the_expected_variance():
  """Fixed clipping at C, z = 2, 2 clients per round: each coordinate of the mean gets
  N(0, (z C / 2)^2); the clients' own values are clipped to C first."""
  z, clip, m, size = 2.0, 1.0, 2, 500
  factory = privacy.build_dp_factory(noise_multiplier=z, clients_per_round=m, clip_norm=clip)
  process = factory.create(tff.TensorType(np.float32, [size]))
  state = process.initialize()
  big = np.zeros(size, np.float32)
  big[0] = 10.0  # L2 norm 10: clipped to 1.
  outputs = []
  with cpp_execution():  # A bare aggregation process: not a round, which tf runs.
    for _ in range(20):
      out = process.next(state, [big, np.zeros(size, np.float32)])
      state = out.state
      outputs.append(np.asarray(out.result))
  outputs = np.stack(outputs)
  assert not np.allclose(outputs[0], outputs[1])  # Fresh noise every round.
  noise = outputs[:, 1:]  # Coordinates whose clipped mean is 0.
  expected = z * clip / m
  assert noise.mean() == pytest.approx(0.0, abs=4 * expected / math.sqrt(noise.size))
  assert noise.std() == pytest.approx(expected, rel=0.05)
  # Coordinate 0: the first client's value clipped to 1, halved by the mean, plus noise.
  assert outputs[:, 0].mean() == pytest.approx(clip / m, abs=4 * expected / math.sqrt(20))


def test_epsilon_grows_with_rounds_and_is_the_rdp_accountants():
  q, z, delta = 4 / 30, 1.1, privacy.default_delta(30)
  assert delta == pytest.approx(30 ** -1.1)
  eps = [privacy.epsilon(noise_multiplier=z, sampling_rate=q, rounds=r, delta=delta)
         for r in range(0, 11)]
  assert eps[0] == 0.0 and all(a < b for a, b in zip(eps, eps[1:]))
  # The same accounting written out with dp_accounting here...
  accountant = dp_accounting.rdp.RdpAccountant(list(privacy.RDP_ORDERS))
  accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), 10)
  assert eps[10] == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
  # ...and the tighter PLD accountant's epsilon is at most RDP's.
  pld = dp_accounting.pld.PLDAccountant()
  pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), 10)
  assert 0 < pld.get_epsilon(delta) <= eps[10]
  # Every client in every round (q = 1): far more privacy spent.
  assert privacy.epsilon(noise_multiplier=z, sampling_rate=1.0, rounds=10,
                         delta=delta) > 3 * eps[10]


def test_adaptive_clipping_count_noise_is_large_enough_for_few_clients():
  assert privacy.clipped_count_stddev(noise_multiplier=1.0, clients_per_round=4) == 1.0
  assert privacy.clipped_count_stddev(noise_multiplier=1.0, clients_per_round=100) == 5.0
  factory = privacy.build_dp_factory(noise_multiplier=1.0, clients_per_round=4)
  factory.create(tff.TensorType(np.float32, [3]))  # TFF accepts the split.


# ---------------------------------------------------------------- secure sum, compression


def _weighted_mean_process(**settings):
  factory = aggregation.build_model_aggregator(zeroing=False, clipping=False, **settings)
  value_type = tff.StructWithPythonType([tff.TensorType(np.float32, [300]),
                                         tff.TensorType(np.float32, [7])], list)
  return factory.create(value_type, tff.TensorType(np.float32))


def test_secure_and_compressed_sums_equal_the_plain_mean_up_to_quantization():
  rng = np.random.default_rng(0)
  values = [[rng.uniform(-1, 1, 300).astype(np.float32), rng.uniform(-1, 1, 7).astype(np.float32)]
            for _ in range(3)]
  weights = [2.0, 5.0, 3.0]

  def mean(**settings):
    process = _weighted_mean_process(**settings)
    with cpp_execution():  # A bare aggregation process: not a round, which tf runs.
      return process.next(process.initialize(), values, weights).result

  plain = mean()
  want = [sum(w * v[i] for w, v in zip(weights, values)) / sum(weights) for i in range(2)]
  assert _max_abs(plain, want) < 1e-6
  # Secure sum: values bounded (+-50 at first) and quantized to 32-bit integers.
  assert _max_abs(mean(secure_aggregation=True), plain) < 1e-6
  # 8 bits between each weighted update's min and max, stochastic rounding: the error of
  # a weighted value is below one step (range / 255), of the mean below that over 1.
  step8 = max(float(np.ptp(w * v[0])) for w, v in zip(weights, values)) / 255
  error8 = _max_abs(mean(update_compression="int8"), plain)
  assert 0 < error8 < step8
  error4 = _max_abs(mean(update_compression="int4"), plain)
  assert error4 > error8  # Coarser.


def test_building_secure_and_compressed_aggregators_logs_no_noise():
  """TensorFlow logs a stack trace per unused bound-check op of TFF's secure sums and
  tensor_encoding a warning per bit-packed tensor; the program drops exactly those."""
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  loggers = [logging.getLogger("tensorflow"), logging.getLogger()]
  for logger in loggers:
    logger.addHandler(handler)
  try:
    for settings in (dict(secure_aggregation=True), dict(update_compression="int8")):
      _weighted_mean_process(**settings)
      gc.collect()
    logging.getLogger("tensorflow").error("Object was never used: something else")
  finally:
    for logger in loggers:
      logger.removeHandler(handler)
  messages = [r.getMessage() for r in records]
  assert not [m for m in messages if "assert_" in m or "bitpacking" in m], messages[:2]
  assert "Object was never used: something else" in messages  # Only those are dropped.


@pytest.fixture(name="tiny_clients", scope="module")
def _tiny_clients(reference_data, tmp_path_factory, bundle):
  """Two training clients of the reference data, cached, with manifests."""
  tmp = tmp_path_factory.mktemp("privacy")
  return list(cache_clients(reference_data, ("site_0", "site_1"), bundle=bundle, tmp=tmp)), tmp


def _task(bundle, clients, tmp, **settings):
  config = config_lib.RunConfig(output_dir=str(tmp / "out"), model="tiny", prompts_per_image=2,
                                batch_size=2, client_optimizer="sgd", client_lr=0.5, seed=0,
                                **settings).validate()
  return tasks.build_task(config=config, bundle=bundle, client_ids=clients,
                          manifest_dir=tmp / "clients")


def _round(task, clients):
  ids = [pipeline.round_client_id(c, 1) for c in clients]
  return task.training_process.next(task.initial_state, ids)


@pytest.fixture(name="plain_task", scope="module")
def _plain_task(bundle, tiny_clients):
  clients, tmp = tiny_clients
  return _task(bundle, clients, tmp)


@pytest.fixture(name="compressed_tasks", scope="module")
def _compressed_tasks(bundle, tiny_clients):
  """`--update_compression` -> its task."""
  clients, tmp = tiny_clients
  return {name: _task(bundle, clients, tmp, update_compression=name)
          for name in config_lib.QUANTIZATION_BITS}


@pytest.fixture(name="plain_round", scope="module")
def _plain_round(plain_task, tiny_clients):
  """(task, its first round's output) with plain aggregation: what the others match."""
  return plain_task, _round(plain_task, tiny_clients[0])


def test_compressed_upload_bytes_come_from_the_packed_type(plain_task, compressed_tasks):
  """Each tensor of n values: ceil(n * bits / 28) int32 words (TFF packs 28 bits per
  word) + its min and max (2 float32)."""
  task = plain_task
  plain = communication.communication(task.training_process)
  sizes = [int(np.prod(w.shape)) for w in task.decoder.trainable_weights]
  assert plain["upload_update"] == 4 * sum(sizes)
  for name, bits in config_lib.QUANTIZATION_BITS.items():
    comm = communication.communication(compressed_tasks[name].training_process,
                                       encoded_update=True)
    assert comm["upload_update"] == sum(4 * math.ceil(n * bits / 28) + 8 for n in sizes), name
    assert comm["broadcast_model"] == plain["broadcast_model"]  # Downloads unchanged.
  assert comm["upload_update"] < plain["upload_update"] / 6  # int4.


@pytest.mark.slow
def test_secure_and_compressed_rounds_match_the_plain_round(bundle, tiny_clients, plain_round,
                                                            compressed_tasks):
  """One round of the program's process: secure aggregation equals plain aggregation
  up to its quantization; int8 uploads move the model almost as far."""
  clients, tmp = tiny_clients
  task, plain = plain_round
  secure = _round(_task(bundle, clients, tmp, secure_aggregation=True), clients)
  int8 = _round(compressed_tasks["int8"], clients)
  moved = _max_abs(plain.state.global_model_weights.trainable,
                   task.initial_state.global_model_weights.trainable)
  assert moved > 1e-3
  assert _max_abs(secure.state.global_model_weights, plain.state.global_model_weights) < 1e-5
  error = _max_abs(int8.state.global_model_weights, plain.state.global_model_weights)
  assert 0 < error < moved / 20
  assert secure.metrics["client_work"]["train"]["loss"] == pytest.approx(
      plain.metrics["client_work"]["train"]["loss"], rel=1e-6)


@pytest.mark.slow
def test_secure_round_under_tf_equals_the_cpp_worker(bundle, tiny_clients):
  """The program's secure-aggregation round: `tf` (the default) as TFF's C++ worker."""
  clients, tmp = tiny_clients
  task = _task(bundle, clients, tmp, secure_aggregation=True)
  mine = _round(task, clients)
  with cpp_execution():
    cpp = _round(task, clients)
  assert _max_abs(mine.state.global_model_weights, cpp.state.global_model_weights) <= 1e-6
  assert mine.metrics["client_work"]["train"]["loss"] == pytest.approx(
      cpp.metrics["client_work"]["train"]["loss"], rel=CROSS_RUNTIME_RTOL)


@pytest.mark.slow
def test_secure_round_in_subrounds_matches_the_plain_round(bundle, tiny_clients, plain_round):
  """TFF's mergeable execution (`--clients_per_subround`, and so `--workers`) splits
  the secure sums too (`execution.compile_to_mergeable`; TFF's own compiler refuses
  them): one client per subround gives the one-shot plain round."""
  clients, tmp = tiny_clients
  _, plain = plain_round
  task = _task(bundle, clients, tmp, secure_aggregation=True)
  with pytest.raises(Exception, match="after_merge"):  # Why the program compiles its own.
    tff.backends.native.compile_to_mergeable_comp_form(task.training_process.next)
  context = execution.build_subround_context(num_subrounds=2)
  with tff.framework.get_context_stack().install(context):
    secure = _round(task, clients)
  assert _max_abs(secure.state.global_model_weights, plain.state.global_model_weights) < 1e-5


# ---------------------------------------------------------------- FedProx


@pytest.mark.slow
def test_fedprox_at_zero_is_fedavg_and_differs_above(bundle, tiny_clients):
  """Two local epochs (one step each): the proximal term's gradient is zero at the
  first step (w = w_global), so one step alone cannot tell them apart."""
  clients, tmp = tiny_clients
  fedavg = _round(_task(bundle, clients, tmp, local_epochs=2), clients).state.global_model_weights
  zero = _round(_task(bundle, clients, tmp, local_epochs=2, algorithm="fedprox"),
                clients).state.global_model_weights
  strong = _round(_task(bundle, clients, tmp, local_epochs=2, algorithm="fedprox",
                        proximal_strength=1.0), clients).state.global_model_weights
  assert _max_abs(zero, fedavg) < 1e-6
  assert _max_abs(strong, fedavg) > 1e-4


# ---------------------------------------------------------------- the program


def test_dp_run_reports_epsilon_every_round(tmp_path, reference_settings):
  config = config_lib.RunConfig(
      output_dir=str(tmp_path / "dp"), **{**reference_settings, "rounds": 2},
      dp_noise_multiplier=1.0, dp_clip_norm=0.05).validate()
  lines = []
  summary = program.run_experiment(config, log=lines.append)
  with open(tmp_path / "dp" / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  expected = privacy.epsilon_fn(noise_multiplier=1.0, clients_per_round=2, num_clients=3)
  assert rows[0]["dp_epsilon"] == ""
  assert [float(r["dp_epsilon"]) for r in rows[1:]] == pytest.approx([expected(1), expected(2)])
  assert [float(r["clipping_norm"]) for r in rows[1:]] == [0.05, 0.05]
  assert all(r["nonfinite_clients"] == "" for r in rows[1:])  # Unweighted: not counted.
  dp = summary["privacy"]
  assert dp["epsilon"] == pytest.approx(expected(2)) and dp["delta"] == pytest.approx(3 ** -1.1)
  assert dp["sampling_rate"] == pytest.approx(2 / 3) and dp["zeroing_covered"] is False
  assert any(line.startswith("differential privacy: noise multiplier 1") for line in lines)
  assert any(line.startswith("round 2/2") and "DP epsilon" in line for line in lines)


def test_dp_with_one_training_client_is_one_line(tmp_path, reference_settings):
  config = config_lib.RunConfig(
      output_dir=str(tmp_path / "one"), **{**reference_settings, "clients_per_round": 1},
      train_clients=("site_0",), dp_noise_multiplier=1.0).validate()
  with pytest.raises(errors.ConfigError, match="^--dp_noise_multiplier: client-level "
                     "differential privacy needs at least 2 training clients, got 1"):
    program.run_experiment(config, log=lambda _: None)


@pytest.mark.parametrize("settings, flag, message", [
    (dict(dp_noise_multiplier=-1.0), "dp_noise_multiplier", "must be >= 0"),
    (dict(dp_clip_norm=0.1), "dp_clip_norm", "is set but differential privacy is off"),
    (dict(dp_noise_multiplier=1.0, dp_target_quantile=1.5), "dp_target_quantile", "must be in"),
    (dict(dp_noise_multiplier=1.0, dp_delta=1.0), "dp_delta", "must be in [0, 1)"),
    (dict(algorithm="fedprox", proximal_strength=-0.1), "proximal_strength", "must be >= 0"),
    (dict(proximal_strength=0.1), "proximal_strength", "is set but --algorithm=fedavg"),
    (dict(algorithm="scaffold"), "algorithm", "must be one of"),
    (dict(secure_aggregation=True, dp_noise_multiplier=1.0), "secure_aggregation",
     "cannot be combined with --dp_noise_multiplier"),
    (dict(secure_aggregation=True, update_compression="int8"), "update_compression",
     "cannot be combined with --secure_aggregation"),
    (dict(dp_noise_multiplier=1.0, update_compression="int4"), "update_compression",
     "cannot be combined with --dp_noise_multiplier"),
    (dict(update_compression="int2"), "update_compression", "must be one of"),
])
def test_bad_privacy_settings_are_one_line_naming_the_flag(settings, flag, message):
  with pytest.raises(errors.ConfigError) as info:
    config_lib.RunConfig(output_dir="x", **settings).validate()
  text = str(info.value)
  assert text.startswith(f"--{flag}: ") and message in text and "\n" not in text


def test_cli_privacy_mistake_is_one_line(tmp_path, reference_data, reference_cache, run_binary):
  result = run_binary("run", f"--output_dir={tmp_path / 'o'}", f"--cache_dir={reference_cache}",
                      f"--data_dir={reference_data}", "--model=tiny", "--rounds=1",
                      "--secure_aggregation", "--dp_noise_multiplier=1")
  assert result.code == 1 and "Traceback" not in result.stderr
  assert len(result.error_lines()) == 1
  assert result.error_lines()[0].startswith(
      "error: --secure_aggregation: cannot be combined with --dp_noise_multiplier")


def test_aggregation_metrics_read_every_layout():
  dp = {"zeroed_count": 1, "zeroing_norm": 3.0,
        "zeroing": {"dp_query_metrics": {"clip": 0.25}, "dp": ()}}
  assert aggregation.aggregation_metrics(dp) == {
      "nonfinite_clients": None, "zeroed_clients": 1, "clipped_clients": None,
      "zeroing_norm": 3.0, "clipping_norm": 0.25}
  weighted = {"nonfinite_clients": 0, "robust": {"clipped_count": 2, "clipping_norm": 1.5}}
  assert aggregation.aggregation_metrics(weighted)["clipped_clients"] == 2
