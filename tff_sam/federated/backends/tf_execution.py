"""`--execution=tf`: TFF's compiled computations run by TensorFlow in this process.

TFF 0.87's only runtime is its C++ `worker_binary`, which is built without CUDA. This
module is a TFF execution context (`TensorFlowExecutionContext`) that runs the same
computations from TFF's own compiled forms with the TensorFlow of this Python
process, so a round can use the GPUs this process sees:

* a TensorFlow computation (e.g. `process.get_model_weights`) runs as it is;
* a federated computation without parameter (`process.initialize`) runs as TFF's
  state-initialization computation (`get_state_initialization_computation`);
* a federated round `(state@SERVER, {data}@CLIENTS) -> (state@SERVER, out@SERVER)`
  (`process.next` of the training and the evaluation process) is compiled to a
  `tff.backends.mapreduce.MapReduceForm` and run as prepare -> work per client ->
  zero/accumulate (one client at a time per device) -> merge -> report -> update.

Every component is a TensorFlow graph imported into its own `tf.Graph` and run with
a `tf.compat.v1.Session` configured as TFF's C++ worker configures its sessions
(`session_config`), so the two executions compute the same ops. The composed
processes of this project take client ids: `work` builds each client's dataset from
its id inside the graph, as TFF's worker does; no dataset is serialized.

With several devices (`devices=["/GPU:0", "/GPU:1"]`), a round's clients are spread
over them round-robin, each device accumulating its own clients one at a time, and
the partial aggregates are merged in device order. Memory therefore does not grow
with the clients per round. Secure sums run as TFF's simulation bodies
(`with_secure_sum_bodies`), as under the C++ worker. A computation this context
cannot run (another shape of federated computation, e.g. a bare aggregation process)
raises `errors.ConfigError` naming `--execution` when it is first compiled
(`compile`), before it runs.
"""

import concurrent.futures
import threading
import weakref
from typing import Any, Optional, Sequence

import tensorflow as tf
import tensorflow_federated as tff
from tensorflow.core.protobuf import rewriter_config_pb2
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.backends.mapreduce import compiler as mapreduce_compiler
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.types import type_conversions
from tensorflow_federated.python.core.impl.utils import tensorflow_utils
from tensorflow_federated.python.tensorflow_libs import serialization_utils

from tff_sam import errors

# Ops that must stay on the host next to their dataset (TFF's worker does the same).
_ITERATOR_OPS = ("IteratorGetNext", "MakeIterator", "AnonymousIteratorV")
HOST = "/device:CPU:0"


def is_host_op(op_type: str) -> bool:
  """Whether ops of `op_type` are requested on the host: datasets and their iterators.

  Their kernels are CPU kernels; an iterator on another device than its dataset fails.
  """
  return op_type.startswith(_ITERATOR_OPS) or "Dataset" in op_type


class OutOfDeviceMemory(Exception):
  """A computation ran out of device memory (`tf.errors.ResourceExhaustedError`)."""


def grappler_off() -> "tf.compat.v1.ConfigProto":
  """The ConfigProto that makes TFF's compilers skip Grappler."""
  config = tf.compat.v1.ConfigProto()
  config.graph_options.rewrite_options.disable_meta_optimizer = True
  return config


def lean_grappler() -> "tf.compat.v1.ConfigProto":
  """Grappler with only its function inliner, pruner and dependency optimizer, once.

  Without them a function call is not inlined, and its gradient computes and keeps
  the whole function's backward pass, the frozen image encoder's too. Measured (an
  online MobileSAM round, 2 images, `tf` execution, 2 cores): Grappler off in the
  functions: first round 29.1 s, second 10.5 s, peak RSS 19.0 GB; Grappler's default
  passes: 286.6 s, 5.4 s, 2.7 GB; these three: 23.9 s, 2.8 s, 2.9 GB; the same losses.
  The other passes (constant folding, arithmetic, layout, remapping, loops, memory)
  cost minutes on a large graph's first run and change no result here.
  """
  config = tf.compat.v1.ConfigProto()
  rewrite = config.graph_options.rewrite_options
  rewrite.optimizers.extend(["function", "pruning", "dependency"])
  rewrite.meta_optimizer_iterations = rewriter_config_pb2.RewriterConfig.ONE
  return config


def session_config() -> "tf.compat.v1.ConfigProto":
  """Session (and function call) options: `lean_grappler`, graph optimizer level L0,
  no XLA JIT, GPU memory allocated as needed, soft placement, static graph (as TFF's
  C++ worker sets them in its `session_provider.cc`, but for Grappler, which it turns
  off).
  """
  config = lean_grappler()
  config.graph_options.optimizer_options.opt_level = tf.compat.v1.OptimizerOptions.L0
  config.graph_options.optimizer_options.global_jit_level = tf.compat.v1.OptimizerOptions.OFF
  config.gpu_options.allow_growth = True
  config.experimental.optimize_for_static_graph = True
  config.experimental.disable_output_partition_graphs = True
  config.allow_soft_placement = True
  return config


def visible_gpus() -> list[str]:
  """Names of the GPUs TensorFlow in this process sees (`/GPU:0`, ...)."""
  return [d.name.replace("/device:", "/") for d in tf.config.list_logical_devices("GPU")]


def _type_name(comp) -> str:
  return str(comp.type_signature).replace("\n", " ")


def flatten_value(value: Any, type_spec: tff.Type) -> list:
  """Leaves of `value` in the order of `type_spec` (TFF's binding order)."""
  if isinstance(type_spec, tff.FederatedType):
    type_spec = type_spec.member
  if isinstance(type_spec, tff.StructType):
    if not isinstance(value, structure.Struct):
      value = structure.from_container(value)
    elements = structure.to_elements(value)
    if len(elements) != len(type_spec):
      raise ValueError(f"{len(elements)} elements where the type {type_spec} has "
                       f"{len(type_spec)}")
    out = []
    for (name, elem_type), (elem_name, elem) in zip(structure.iter_elements(type_spec),
                                                    elements):
      if name is not None and elem_name is not None and name != elem_name:
        raise ValueError(f"element {elem_name!r} where the type has {name!r}")
      out.extend(flatten_value(elem, elem_type))
    return out
  return [value]


def pack_value(flat: Sequence[Any], type_spec: tff.Type) -> Any:
  """Inverse of `flatten_value`: a Python container of `type_spec`'s shape."""
  leaves = iter(flat)

  def build(t):
    if isinstance(t, tff.FederatedType):
      t = t.member
    if isinstance(t, tff.StructType):
      return structure.Struct([(n, build(e)) for n, e in structure.iter_elements(t)])
    return next(leaves)

  value = build(type_spec)
  if next(leaves, None) is not None:
    raise ValueError(f"more values than the type {type_spec} holds")
  return type_conversions.type_to_py_container(value, type_spec)


_CALL_OPS = ("StatefulPartitionedCall", "PartitionedCall")


def _pin(graph_def, device: Optional[str]):
  """Dataset and iterator ops on the host (`is_host_op`), also inside functions; with
  `device`, every other unplaced node of the graph there (the nodes of the functions
  it calls run where their call runs).

  Every function call also gets the session's options (`session_config`): the call
  nodes carry the options of the context TFF traced them in (all of Grappler, no GPU),
  with which TensorFlow re-optimizes each function body on its first run. Measured
  (tiny model): the first round 24.2 s -> 12.3 s, later rounds and losses unchanged;
  online MobileSAM in `lean_grappler`.
  """
  call_config = session_config().SerializeToString()
  functions = [f.node_def for f in graph_def.library.function]
  for nodes in [graph_def.node, *functions]:
    for node in nodes:
      if is_host_op(node.op):
        node.device = HOST
      elif node.op in _CALL_OPS and "config_proto" in node.attr:
        node.attr["config_proto"].s = call_config
  if device is not None:
    for node in graph_def.node:
      if not node.device:
        node.device = device
  return graph_def


class EmbeddedComputation:
  """One TFF TensorFlow computation, imported into its own graph and session.

  Args:
    comp: A `tff.tensorflow.computation` (its proto holds a TensorFlow graph).
    device: Where its nodes go (`/GPU:1`); None = TensorFlow's choice (a GPU if any).
  """

  def __init__(self, comp, *, device: Optional[str] = None):
    proto = computation_impl.ConcreteComputation.get_proto(comp)
    if proto.WhichOneof("computation") != "tensorflow":
      raise TypeError(f"not a TensorFlow computation: {_type_name(comp)}")
    tfp = proto.tensorflow
    self.type_signature = comp.type_signature
    self.device = device
    self.graph = tf.Graph()
    graph_def = _pin(serialization_utils.unpack_graph_def(tfp.graph_def), device)
    with self.graph.as_default():
      tf.graph_util.import_graph_def(graph_def, name="")
    self.params = (tensorflow_utils.extract_tensor_names_from_binding(tfp.parameter)
                   if tfp.HasField("parameter") else [])
    self.results = tensorflow_utils.extract_tensor_names_from_binding(tfp.result)
    self.init_op = tfp.initialize_op or None
    self.session_token = tfp.session_token_tensor_name or None
    self.session = tf.compat.v1.Session(graph=self.graph, config=session_config())

  def __call__(self, arg: Any = None) -> Any:
    """Runs the computation on `arg` (a value of its parameter type)."""
    feed = {}
    if self.params:
      feed = dict(zip(self.params, flatten_value(arg, self.type_signature.parameter)))
    if self.session_token:
      feed[self.session_token] = "tff_sam"
    try:
      if self.init_op:
        self.session.run(self.init_op, feed_dict=feed)
      out = self.session.run(self.results, feed_dict=feed)
    except tf.errors.ResourceExhaustedError as e:
      raise OutOfDeviceMemory(e.message.splitlines()[0] if e.message else str(e)) from None
    return pack_value(out, self.type_signature.result)

  def close(self) -> None:
    self.session.close()


def with_secure_sum_bodies(comp) -> Any:
  """`comp` with TFF's simulation bodies for its secure sums (`federated_secure_sum*`).

  TFF has no cryptographic secure-sum protocol in any runtime; its test contexts and
  its C++ worker run these bodies (`tff.backends.test.replace_secure_intrinsics_with_bodies`):
  each client's value is checked against the bound, shifted and quantized to integers,
  summed in the clear (modular where the intrinsic is modular) and mapped back. The
  same bodies here give the same sums as `--execution=cpp`. A computation without
  secure sums is returned unchanged; the type signature (its Python containers) is kept.
  """
  replaced = tff.backends.test.replace_secure_intrinsics_with_bodies(comp)
  return tff.framework.ConcreteComputation.with_type(replaced, comp.type_signature)


def _secure_sum_parts(mrf) -> list[str]:
  """Names of the secure-sum paths `mrf` uses (non-empty `work` outputs 1-3)."""
  names = ("federated_secure_sum_bitwidth", "federated_secure_sum",
           "federated_secure_modular_sum")
  outputs = mrf.work.type_signature.result
  return [n for n, t in zip(names, list(outputs)[1:])
          if not (isinstance(t, tff.StructType) and len(t) == 0)]


class _Round:
  """A federated round from its MapReduceForm: `(state, client values) -> result`."""

  def __init__(self, comp, *, devices: Sequence[Optional[str]]):
    try:
      mrf = tff.backends.mapreduce.get_map_reduce_form_for_computation(
          with_secure_sum_bodies(comp), grappler_config=grappler_off())
    except (TypeError, ValueError, mapreduce_compiler.MapReduceFormCompilationError) as e:
      raise errors.ConfigError(
          "execution", f"tf cannot run the computation {_type_name(comp)} (TFF cannot "
          f"compile it to a MapReduceForm: {' '.join(str(e).split())}); use --execution=cpp"
      ) from None
    secure = _secure_sum_parts(mrf)
    if secure:  # `with_secure_sum_bodies` replaced them all: a TFF change would show here.
      raise errors.ConfigError(
          "execution", f"tf cannot run {', '.join(secure)} (TFF left a secure-sum "
          "intrinsic in the MapReduceForm); use --execution=cpp")
    self.type_signature = comp.type_signature
    self.mrf = mrf
    self.devices = list(devices) or [None]
    server = self.devices[0]
    self.prepare = EmbeddedComputation(mrf.prepare, device=server)
    # Per device its own work, zero and accumulate (a session's variables are not
    # shared between the threads of several devices).
    self.works = [EmbeddedComputation(mrf.work, device=d) for d in self.devices]
    self.zeros = [EmbeddedComputation(mrf.zero, device=d) for d in self.devices]
    self.accumulates = [EmbeddedComputation(mrf.accumulate, device=d) for d in self.devices]
    self.merge = EmbeddedComputation(mrf.merge, device=server)
    self.report = EmbeddedComputation(mrf.report, device=server)
    self.update = EmbeddedComputation(mrf.update, device=server)
    self._empty_secure = [structure.Struct([])] * 3

  def _accumulate(self, device: int, clients: Sequence[Any], broadcast: Any):
    """Device `device`'s clients, one at a time: zero, then work -> accumulate each."""
    acc = self.zeros[device]()
    for client in clients:
      acc = self.accumulates[device]([acc, self.works[device]([client, broadcast])[0]])
    return acc

  def parts(self) -> list[EmbeddedComputation]:
    """Every component (to close their sessions)."""
    return [*self.works, *self.zeros, *self.accumulates, self.prepare, self.merge,
            self.report, self.update]

  def __call__(self, arg: Any) -> Any:
    (_, state), (_, client_values) = structure.to_elements(structure.from_container(arg))
    client_values = list(client_values)
    broadcast = self.prepare(state)
    n = len(self.works)
    if n == 1:
      acc = self._accumulate(0, client_values, broadcast)
    else:
      shards = [client_values[i::n] for i in range(n)]
      with concurrent.futures.ThreadPoolExecutor(n) as pool:
        partials = list(pool.map(lambda i: self._accumulate(i, shards[i], broadcast), range(n)))
      acc = partials[0]
      for partial in partials[1:]:
        acc = self.merge([acc, partial])
    result = self.update([state, [self.report(acc), *self._empty_secure]])
    flat = flatten_value(result, self.update.type_signature.result)
    return pack_value(flat, self.type_signature.result)


class TensorFlowExecutionContext(tff.framework.SyncContext):
  """A TFF context running computations with TensorFlow in this process.

  Install it with `tff.framework.set_default_context` (or `install` for a `with`
  block). Each computation is compiled once, on its first call or by `compile`.

  Args:
    devices: Devices the clients' work is spread over (`/GPU:0`, ...); empty = one
      place of TensorFlow's choice (the first GPU if there is one, else the CPU).
  """

  def __init__(self, *, devices: Sequence[str] = ()):
    self.devices = list(devices)
    # id(comp) -> (a weak reference to comp, its runnable form). Weak: a computation
    # nobody holds any more (a finished run's process) takes its graphs and sessions
    # with it (`_forget`), so a process running many programs does not grow.
    self._compiled: dict[int, tuple[weakref.ref, Any]] = {}
    self._lock = threading.Lock()

  def _forget(self, key: int) -> None:
    with self._lock:
      entry = self._compiled.pop(key, None)
    if entry is not None:
      _close(entry[1])

  def compile(self, comp) -> Any:
    """The runnable form of `comp` (compiled on first use; errors are one line)."""
    with self._lock:
      hit = self._compiled.get(id(comp))
      if hit is not None and hit[0]() is comp:
        return hit[1]
      proto = computation_impl.ConcreteComputation.get_proto(comp)
      signature = comp.type_signature
      first_device = self.devices[0] if self.devices else None
      if proto.WhichOneof("computation") == "tensorflow":
        runnable = EmbeddedComputation(comp, device=first_device)
      elif signature.parameter is None:
        runnable = EmbeddedComputation(
            tff.backends.mapreduce.get_state_initialization_computation(
                comp, grappler_config=grappler_off()),
            device=first_device)
        runnable.type_signature = signature
      else:
        runnable = _Round(comp, devices=self.devices)
      self._compiled[id(comp)] = (weakref.ref(comp), runnable)
      weakref.finalize(comp, self._forget, id(comp)).atexit = False
      return runnable

  def invoke(self, comp, arg):
    runnable = self.compile(comp)
    if arg is not None:
      arg = tff.tensorflow.transform_args(
          structure.to_odict_or_tuple(arg) if isinstance(arg, structure.Struct) else arg)
    return runnable(arg) if arg is not None else runnable()

  def close(self) -> None:
    """Closes every session; a computation called afterwards is compiled afresh."""
    with self._lock:
      entries, self._compiled = list(self._compiled.values()), {}
    for _, runnable in entries:
      _close(runnable)


def _close(runnable) -> None:
  """Closes the sessions of a compiled computation (`EmbeddedComputation` or `_Round`)."""
  for part in runnable.parts() if isinstance(runnable, _Round) else [runnable]:
    part.close()


def compile_computations(*comps) -> None:
  """Compiles `comps` now if the current TFF context is a `TensorFlowExecutionContext`.

  What it cannot run then fails here, before the program's first round; under any
  other context this does nothing.

  Raises:
    errors.ConfigError: naming `--execution`.
  """
  context = tff.framework.get_context_stack().current
  if isinstance(context, TensorFlowExecutionContext):
    for comp in comps:
      context.compile(comp)
