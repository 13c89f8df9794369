"""A TFF learning process run from its compiled MapReduceForm by TF in this process.

Work in progress for `--execution=tf` (issue 14), not yet used by the program: TFF
compiles `process.next` to a `tff.backends.mapreduce.MapReduceForm` (Grappler off) and
`process.initialize` to its state-initialization computation; each component (prepare,
work, zero, accumulate, report, update) is a TensorFlow computation whose GraphDef is
imported into its own `tf.Graph` and run with a `tf.compat.v1.Session` here, so it can
use a GPU. A round is prepare -> (work -> accumulate) per client, one client at a time
-> report -> update. The composed processes of this project take client ids, so
`work` builds each client's dataset from its id inside the graph.
"""

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.types import type_conversions
from tensorflow_federated.python.core.impl.utils import tensorflow_utils
from tensorflow_federated.python.tensorflow_libs import serialization_utils


def _grappler_off() -> "tf.compat.v1.ConfigProto":
  config = tf.compat.v1.ConfigProto()
  config.graph_options.rewrite_options.disable_meta_optimizer = True
  return config


def flatten_value(value, type_spec) -> list:
  """Leaves of `value` in the order of `type_spec` (TFF's binding order)."""
  if isinstance(type_spec, tff.FederatedType):
    type_spec = type_spec.member
  if isinstance(type_spec, tff.StructType):
    if not isinstance(value, structure.Struct):
      value = structure.from_container(value)
    out = []
    for (name, elem_type), elem in zip(structure.iter_elements(type_spec),
                                       structure.to_elements(value)):
      if name is not None and elem[0] is not None and name != elem[0]:
        raise ValueError(f"element {elem[0]!r} where the type has {name!r}")
      out.extend(flatten_value(elem[1], elem_type))
    return out
  return [value]


def pack_value(flat, type_spec):
  """Inverse of `flatten_value`: a Python container of `type_spec`'s shape."""
  flat = list(flat)

  def build(t):
    if isinstance(t, tff.FederatedType):
      t = t.member
    if isinstance(t, tff.StructType):
      return structure.Struct([(n, build(e)) for n, e in structure.iter_elements(t)])
    return flat.pop(0)

  value = build(type_spec)
  assert not flat
  return type_conversions.type_to_py_container(value, type_spec)


class EmbeddedComputation:
  """One TFF TensorFlow computation, imported into its own graph and session."""

  def __init__(self, comp, *, config=None):
    proto = computation_impl.ConcreteComputation.get_proto(comp)
    tfp = proto.tensorflow
    self.type_signature = comp.type_signature
    self.graph = tf.Graph()
    with self.graph.as_default():
      tf.graph_util.import_graph_def(serialization_utils.unpack_graph_def(tfp.graph_def),
                                     name="")
    self.params = (tensorflow_utils.extract_tensor_names_from_binding(tfp.parameter)
                   if tfp.HasField("parameter") else [])
    self.results = tensorflow_utils.extract_tensor_names_from_binding(tfp.result)
    self.init_op = tfp.initialize_op or None
    self.session_token = tfp.session_token_tensor_name or None
    self.session = tf.compat.v1.Session(graph=self.graph,
                                        config=config if config is not None else _grappler_off())

  def __call__(self, arg=None):
    """Runs the computation on `arg` (a value of its parameter type)."""
    feed = {}
    if self.params:
      feed = dict(zip(self.params, flatten_value(arg, self.type_signature.parameter)))
    if self.session_token:
      feed[self.session_token] = "tff_sam"
    if self.init_op:
      self.session.run(self.init_op, feed_dict=feed)
    out = self.session.run(self.results, feed_dict=feed)
    return pack_value(out, self.type_signature.result)


class MapReduceRunner:
  """`initialize()` and `next(state, client_ids)` of a process, run in this process."""

  def __init__(self, process):
    grappler = _grappler_off()
    self.process = process
    self.mrf = tff.backends.mapreduce.get_map_reduce_form_for_computation(
        process.next, grappler_config=grappler)
    self._init = EmbeddedComputation(tff.backends.mapreduce.get_state_initialization_computation(
        process.initialize, grappler_config=grappler))
    m = self.mrf
    self.prepare, self.work, self.zero = EmbeddedComputation(m.prepare), EmbeddedComputation(m.work), EmbeddedComputation(m.zero)
    self.accumulate, self.merge = EmbeddedComputation(m.accumulate), EmbeddedComputation(m.merge)
    self.report, self.update = EmbeddedComputation(m.report), EmbeddedComputation(m.update)
    self.secure = [EmbeddedComputation(c) for c in (m.secure_sum_bitwidth, m.secure_sum_max_input,
                                         m.secure_modular_sum_modulus)]

  def initialize(self):
    """The process's initial state."""
    return self._init()

  def next(self, state, client_ids):
    """One round over `client_ids`: the process's (state, metrics) output."""
    broadcast = self.prepare(state)
    acc = self.zero()
    secure = None
    for client in client_ids:
      out = self.work([client, broadcast])
      acc = self.accumulate([acc, out[0]])
      secure = out[1:]
    aggregate = self.report(acc)
    # Secure aggregation paths: empty structures for the processes this project builds.
    update_arg = [state, [aggregate, *([structure.Struct([])] * 3 if secure is None else secure)]]
    result = self.update(update_arg)
    flat = flatten_value(result, self.update.type_signature.result)
    return pack_value(flat, self.process.next.type_signature.result)
