"""`--execution=tf`: TFF's compiled computations run by TensorFlow in this process.

`tf` is the default: every other test's rounds run under it. Here the program's own
training and evaluation processes (tiny config, robust aggregation and federated
evaluation on; online mode; LoRA) run under `tf_execution` and under TFF's C++ worker
in one test process; the rounds must agree. Plus the context's own paths: values in
and out, several devices, secure sums, and what it refuses.
"""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam.data import pipeline
from tff_sam.federated.backends import execution
from tff_sam.federated.backends import tf_execution
from tff_sam.federated.learning import tasks
from tff_sam.federated.program import program
from tff_sam.models import adapted
from tff_sam.models import build

from conftest import CROSS_RUNTIME_RTOL
from conftest import cache_clients
from conftest import cpp_execution


def _installed(context):
  return tff.framework.get_context_stack().install(context)


def _max_abs_difference(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)))


@pytest.fixture(name="tiny_task_inputs", scope="module")
def _tiny_task_inputs(reference_data, tmp_path_factory):
  """Two training clients and one federated evaluation client, cached."""
  tmp = tmp_path_factory.mktemp("tf_execution")
  bundle = build.load_sam("tiny")
  clients = cache_clients(reference_data, ("site_0", "site_1"), bundle=bundle, tmp=tmp)
  cache_clients(reference_data / "test", ("site_0",), bundle=bundle, tmp=tmp,
                manifests="eval_clients")
  return bundle, list(clients), tmp


@pytest.mark.slow
def test_two_rounds_equal_the_cpp_worker(tiny_task_inputs):
  """Weights to 1e-6 and metrics to `CROSS_RUNTIME_RTOL`, with plain SGD on the clients.

  With Adam (the default) the metrics still agree to 1e-6 but the weights only to
  about 4e-5 after two rounds (measured): the C++ worker's statically linked TF and
  this process's TF round some kernels differently in the last bit, and Adam's first
  steps divide each gradient by its own magnitude (+1e-7), which turns last-bit
  differences in near-zero gradients into differences of a fraction of the learning
  rate. With SGD the same runs differ by at most 6e-8.
  """
  bundle, clients, tmp = tiny_task_inputs
  config = config_lib.RunConfig(output_dir=str(tmp / "out"), model="tiny",
                                prompts_per_image=2, batch_size=2, client_optimizer="sgd",
                                client_lr=0.5, seed=0)
  assert config.zeroing and config.clipping  # Robust aggregation on.
  task = tasks.build_task(config=config, bundle=bundle, client_ids=clients,
                          manifest_dir=tmp / "clients", evaluation_clients=["site_0"],
                          evaluation_manifest_dir=tmp / "eval_clients", evaluation_chunk=4)

  def two_rounds():
    state, out = task.initial_state, []
    for round_num in (1, 2):
      result = task.training_process.next(
          state, [pipeline.round_client_id(c, round_num) for c in clients])
      state = result.state
      out.append((state, result.metrics, task.federated_evaluation(state)))
    return out, task.training_process.initialize()

  with cpp_execution():
    cpp, cpp_init = two_rounds()
  context = tf_execution.TensorFlowExecutionContext()
  with _installed(context):
    mine, mine_init = two_rounds()
  assert _max_abs_difference(mine_init, cpp_init) == 0.0
  moved = _max_abs_difference(cpp[-1][0].global_model_weights,
                              task.initial_state.global_model_weights)
  assert moved > 1e-3  # The rounds changed the model.
  for (state, metrics, fed_eval), (cpp_state, cpp_metrics, cpp_fed_eval) in zip(mine, cpp):
    assert type(state) is type(cpp_state)
    assert _max_abs_difference(state.global_model_weights,
                               cpp_state.global_model_weights) <= 1e-6
    # Optimizer and aggregator states (Adam's server moments, adaptive norms) too.
    assert _max_abs_difference(state, cpp_state) <= 1e-6
    flat, cpp_flat = (tf.nest.flatten(m) for m in (metrics, cpp_metrics))
    assert len(flat) == len(cpp_flat) >= 10
    np.testing.assert_allclose(np.asarray(flat, np.float64), np.asarray(cpp_flat, np.float64),
                               rtol=CROSS_RUNTIME_RTOL, atol=1e-7)
    assert metrics["aggregator"]["robust"]["zeroing"]["clipped_count"] == (
        cpp_metrics["aggregator"]["robust"]["zeroing"]["clipped_count"])
    for key in ("fed_eval_loss", "fed_eval_dice"):
      assert fed_eval[key] == pytest.approx(cpp_fed_eval[key], rel=CROSS_RUNTIME_RTOL)
  # A compiled computation is reused, not compiled again.
  assert context.compile(task.training_process.next) is context.compile(
      task.training_process.next)


def _round_under_both(task, clients):
  """Round 1 of `task` under the C++ worker and under tf: equal weights (1e-6) and
  training metrics (4 examples, `CROSS_RUNTIME_RTOL`); returns the C++ worker's result."""
  ids = [pipeline.round_client_id(c, 1) for c in clients]
  with cpp_execution():
    cpp = task.training_process.next(task.initial_state, ids)
  with _installed(tf_execution.TensorFlowExecutionContext()):
    mine = task.training_process.next(task.initial_state, ids)
  assert _max_abs_difference(mine.state.global_model_weights,
                             cpp.state.global_model_weights) <= 1e-6
  train, cpp_train = mine.metrics["client_work"]["train"], cpp.metrics["client_work"]["train"]
  assert train["num_examples"] == cpp_train["num_examples"] == 4
  assert train["loss"] == pytest.approx(cpp_train["loss"], rel=CROSS_RUNTIME_RTOL)
  return cpp


@pytest.mark.slow
def test_online_round_equals_the_cpp_worker(tiny_task_inputs, reference_data):
  """Online mode (the frozen encoder inside the TFF model) under tf: one round as cpp."""
  bundle, clients, tmp = tiny_task_inputs
  cache_clients(reference_data, clients, bundle=bundle, tmp=tmp, manifests="online_clients",
                online=True)
  config = config_lib.RunConfig(output_dir=str(tmp / "online"), model="tiny",
                                embedding_cache=False, prompts_per_image=2, batch_size=2,
                                client_optimizer="sgd", client_lr=0.5, seed=0)
  task = tasks.build_task(config=config, bundle=bundle, client_ids=clients,
                          manifest_dir=tmp / "online_clients")
  cpp = _round_under_both(task, clients)
  assert _max_abs_difference(cpp.state.global_model_weights,
                             task.initial_state.global_model_weights) > 1e-3


@pytest.mark.slow
def test_lora_round_equals_the_cpp_worker(tiny_task_inputs, reference_data):
  """`--adapter=lora` (adapters in the encoder, its base read from the site copy by the
  computation, features from the cache) under tf: one round as cpp."""
  bundle, clients, tmp = tiny_task_inputs
  cache_clients(reference_data, clients, bundle=bundle, tmp=tmp, manifests="feature_clients",
                feature_start=0)
  config = config_lib.RunConfig(output_dir=str(tmp / "lora"), model="tiny", adapter="lora",
                                lora_targets=("qkv", "mlp"), prompts_per_image=2, batch_size=2,
                                client_optimizer="sgd", client_lr=0.5, seed=0)
  task = tasks.build_task(config=config, bundle=bundle, client_ids=clients,
                          manifest_dir=tmp / "feature_clients",
                          site_weights=adapted.write_site_weights(bundle, cache_root=tmp))
  cpp = _round_under_both(task, clients)
  moved = {id(w): float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for w, a, b in zip(
      task.model.trainable_weights, cpp.state.global_model_weights.trainable,
      task.initial_state.global_model_weights.trainable, strict=True)}
  assert min(moved[id(a.layer.lora_b)] for a in task.model.adapters) > 0  # Every B moved.


def _requested_devices(embedded) -> dict[str, set[str]]:
  """Op type -> the devices its ops request, in `embedded`'s graph and its functions."""
  requested = collections.defaultdict(set)
  graph_def = embedded.graph.as_graph_def()
  for nodes in [graph_def.node, *(f.node_def for f in graph_def.library.function)]:
    for node in nodes:
      requested[node.op].add(node.device)
  return requested


@pytest.mark.slow
def test_gpu_placement_read_from_the_graphs_and_results_equal_one_device(tiny_task_inputs,
                                                                         reference_data):
  """The runner given `/GPU:0`, then `/GPU:0,/GPU:1`, on this CPU (soft placement):
  every client's work is requested on its GPU (round-robin), datasets and iterators on
  the host as TFF's worker pins them, the server's parts on the first GPU; the round
  equals the one-device round."""
  bundle, clients, tmp = tiny_task_inputs
  clients = [*clients, "site_2"]  # Three clients over two devices.
  cache_clients(reference_data, ["site_2"], bundle=bundle, tmp=tmp)
  config = config_lib.RunConfig(output_dir=str(tmp / "gpu"), model="tiny", prompts_per_image=2,
                                batch_size=2, client_optimizer="sgd", client_lr=0.5, seed=0)
  task = tasks.build_task(config=config, bundle=bundle, client_ids=clients,
                          manifest_dir=tmp / "clients")
  ids = [pipeline.round_client_id(c, 1) for c in clients]
  one = task.training_process.next(task.initial_state, ids)  # The default: one device.
  for gpus in (["/GPU:0"], ["/GPU:0", "/GPU:1"]):
    context = tf_execution.TensorFlowExecutionContext(devices=gpus)
    runnable = context.compile(task.training_process.next)
    calls = []
    for i, work in enumerate(list(runnable.works)):
      runnable.works[i] = lambda arg, i=i, work=work: (calls.append(i), work(arg))[1]
    with _installed(context):
      mine = task.training_process.next(task.initial_state, ids)
    # Round-robin: clients 0 and 2 on the first device, 1 on the second.
    assert sorted(calls) == sorted(i % len(gpus) for i in range(len(clients)))
    assert _max_abs_difference(mine.state, one.state) <= 1e-6
    assert mine.metrics["client_work"]["train"]["loss"] == pytest.approx(
        one.metrics["client_work"]["train"]["loss"], rel=1e-6)
    runnable.works[:] = [w.__defaults__[1] for w in runnable.works]
    for i, work in enumerate(runnable.works):
      gpu = f"/device:GPU:{i}"
      host = {op: d for op, d in _requested_devices(work).items() if tf_execution.is_host_op(op)}
      assert {"IteratorGetNextAsOptional", "MakeIterator", "TFRecordDataset"} <= set(host)
      assert all(d == {tf_execution.HOST} for d in host.values()), host
      top = [op for op in work.graph.get_operations() if not tf_execution.is_host_op(op.type)]
      # The client's training (a function call; its nodes run where the call runs).
      assert {op.device for op in top if op.type == "StatefulPartitionedCall"} == {gpu}
      on_gpu = collections.Counter(op.device == gpu for op in top)
      assert on_gpu[True] / len(top) > 0.99, on_gpu
    for part in (runnable.prepare, runnable.merge, runnable.report, runnable.update):
      devices = {op.device for op in part.graph.get_operations()}
      assert devices <= {"/device:GPU:0", tf_execution.HOST}, devices
    context.close()


def test_flatten_and_pack_follow_the_type():
  t = tff.StructType([("a", np.float32), ("b", tff.StructType([("c", np.int32),
                                                                 ("d", np.float32)]))])
  value = collections.OrderedDict(a=1.0, b=collections.OrderedDict(c=2, d=3.0))
  flat = tf_execution.flatten_value(value, t)
  assert flat == [1.0, 2, 3.0]
  assert tf_execution.pack_value(flat, t) == value
  with pytest.raises(ValueError, match="'x' where the type has 'a'"):
    tf_execution.flatten_value(collections.OrderedDict(x=1.0, b=value["b"]), t)
  with pytest.raises(ValueError, match="more values"):
    tf_execution.pack_value([1.0, 2, 3.0, 4.0], t)


def _sum_round():
  @tff.tensorflow.computation(np.int32)
  def add_one(x):
    return x + 1

  @tff.federated_computation(tff.FederatedType(np.int32, tff.SERVER),
                             tff.FederatedType(np.float32, tff.CLIENTS))
  def next_fn(state, values):
    return tff.federated_map(add_one, state), tff.federated_sum(values)

  return next_fn


def test_clients_spread_over_devices_and_merged():
  """Several devices: each accumulates its share of the clients; the parts merge."""
  next_fn = _sum_round()
  values = [1.0, 2.0, 3.0, 4.0, 5.0]
  one = tf_execution.TensorFlowExecutionContext()
  two = tf_execution.TensorFlowExecutionContext(devices=["/CPU:0", "/CPU:0"])
  with _installed(one):
    assert next_fn(3, values) == (4, 15.0)
  with _installed(two):
    runnable = two.compile(next_fn)
    assert len(runnable.works) == 2
    calls, originals = [], list(runnable.works)
    for i, work in enumerate(originals):
      original = work.__call__
      runnable.works[i] = lambda arg, i=i, original=original: (calls.append(i), original(arg))[1]
    assert next_fn(3, values) == (4, 15.0)
    runnable.works[:] = originals
  assert sorted(calls) == [0, 0, 0, 1, 1]  # Round-robin: clients 0, 2, 4 and 1, 3.
  for context in (one, two):
    context.close()  # Every session of every compiled computation.
  assert two.compile(next_fn) is not runnable  # Compiled afresh after close.


def test_secure_sums_equal_the_cpp_worker():
  """TFF's simulation bodies for its secure sums, as the C++ worker runs them: the
  bounded sum, the bitwidth sum (not modular: TFF widens it) and a value over the bound."""
  @tff.federated_computation(tff.FederatedType(np.int32, tff.SERVER),
                             tff.FederatedType(np.int32, tff.CLIENTS))
  def next_fn(state, values):
    return state, [tff.federated_secure_sum_bitwidth(values, 8),
                   tff.federated_secure_sum(values, 300)]

  context = tf_execution.TensorFlowExecutionContext()
  runnable = context.compile(next_fn)
  assert not tf_execution._secure_sum_parts(runnable.mrf)  # pylint: disable=protected-access
  values = [1, 2, 3, 250]
  with _installed(context):
    mine = next_fn(3, values)
  with cpp_execution():
    cpp = next_fn(3, values)
  assert mine == cpp == (3, [256, 256])
  with cpp_execution(), pytest.raises(Exception, match="client value larger than maximum"):
    next_fn(3, [1, 301])
  with _installed(context), pytest.raises(Exception, match="client value larger than maximum"):
    next_fn(3, [1, 301])


def test_computation_without_round_shape_is_refused():
  @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
  def total(values):
    return tff.federated_sum(values)

  with pytest.raises(errors.ConfigError, match=r"^--execution: tf cannot run the computation "
                     r".*use --execution=cpp$"):
    tf_execution.TensorFlowExecutionContext().compile(total)


def test_out_of_memory_becomes_its_own_error(monkeypatch):
  """`ResourceExhaustedError` from a session becomes `OutOfDeviceMemory` (one line)."""
  @tff.tensorflow.computation(np.float32)
  def double(x):
    return x * 2.0

  embedded = tf_execution.EmbeddedComputation(double)
  assert embedded(1.5) == 3.0

  def exhausted(*_, **__):
    raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor\nmore")

  monkeypatch.setattr(embedded.session, "run", exhausted)
  with pytest.raises(tf_execution.OutOfDeviceMemory, match=r"^OOM when allocating tensor$"):
    embedded(1.5)


def test_program_turns_out_of_memory_into_one_line_naming_the_round(tmp_path, monkeypatch):
  def out_of_memory(config, *, out, versions, log, progress):
    del config, out, versions, log
    progress["section"] = "round 2"
    raise tf_execution.OutOfDeviceMemory("OOM when allocating tensor with shape[4,256,64,64]")

  monkeypatch.setattr(program, "_run_experiment", out_of_memory)
  config = config_lib.RunConfig(output_dir=str(tmp_path / "out"), model="tiny", execution="tf")
  with pytest.raises(errors.UserError) as info:
    program.run_experiment(config, log=lambda _: None)
  message = str(info.value)
  assert message.startswith("out of device memory during round 2 (--execution=tf: OOM when "
                            "allocating tensor with shape[4,256,64,64]); lower --batch_size")
  assert "run the same command again: it resumes" in message and "\n" not in message


def test_default_execution_is_tf_with_or_without_gpus(monkeypatch):
  assert config_lib.RunConfig(output_dir="x").execution == "tf"
  assert isinstance(tff.framework.get_context_stack().current,
                    tf_execution.TensorFlowExecutionContext)  # conftest: as the binaries.
  monkeypatch.setattr(tf_execution, "visible_gpus", lambda: [])
  assert "CPU only" in execution.describe_execution("cpp")
  assert "TensorFlow sees no GPU" in execution.describe_execution("tf")
  monkeypatch.setattr(tf_execution, "visible_gpus", lambda: ["/GPU:0"])
  assert "on 1 GPU(s): /GPU:0" in execution.describe_execution("tf")
