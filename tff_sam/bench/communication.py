"""Section 4 of the benchmark: bytes each client receives and sends per round.

Read from the type signatures of the broadcast and aggregation intrinsics inside a
process's `next` computation (`communication`), then tabulated for the cached
(decoder-only), LoRA + decoder, compressed (`--update_compression`), online and
(derived) full-model processes (`bytes_per_client_round`). Section 7's
bytes between this process and its `--workers` per round come from the type
signatures of the round's `MergeableCompForm` (`worker_bytes_per_round`).
"""

from typing import Any, Optional

import numpy as np
import tensorflow_federated as tff
from tensorflow_federated.python.core.backends.native import mergeable_comp_compiler


def type_bytes(type_spec: tff.types.Type) -> int:
  """Bytes of a value of a TFF type: element counts x dtype sizes, over its tensors.

  Federated types count their member once (the value one client sends or receives).
  """
  if isinstance(type_spec, tff.types.FederatedType):
    return type_bytes(type_spec.member)
  if isinstance(type_spec, tff.types.TensorType):
    if type_spec.shape is None or any(d is None for d in type_spec.shape):
      raise ValueError(f"tensor of unknown shape in {type_spec}")
    return int(np.prod(type_spec.shape, dtype=np.int64)) * np.dtype(type_spec.dtype).itemsize
  if isinstance(type_spec, tff.types.StructType):
    return sum(type_bytes(t) for t in type_spec)
  raise ValueError(f"cannot size a value of type {type_spec}")


def _wire_bytes(type_spec: tff.types.Type) -> int:
  """Bytes of a value sent to or from a worker, less its clients-placed parts.

  The clients-placed parts of a round's argument are the client ids (strings of a
  few dozen bytes each, no fixed size); everything else is numeric tensors.
  """
  if isinstance(type_spec, tff.types.FederatedType):
    return 0 if type_spec.placement is tff.CLIENTS else type_bytes(type_spec.member)
  if isinstance(type_spec, tff.types.StructType):
    return sum(_wire_bytes(t) for t in type_spec)
  return type_bytes(type_spec)


def worker_bytes_per_round(process: tff.learning.templates.LearningProcess, *,
                           num_subrounds: int) -> dict[str, Any]:
  """Bytes between this process and its `--workers` per round, from the type signatures.

  Under `--workers` TFF's mergeable context runs `MergeableCompForm`'s parts on the
  workers: per sub-round `up_to_merge` (in: the server state and the sub-round's
  client ids; out: its partial aggregate), `num_subrounds - 1` merges (two partial
  aggregates in, one out) and one `after_merge` (the round's argument and the merged
  aggregate in; the new state and the metrics out). The clients' own data never
  travels: each worker reads it by id.

  Returns:
    The part sizes and `total` bytes per round (client ids not counted).
  """
  form = mergeable_comp_compiler.compile_to_mergeable_comp_form(process.next)
  state_in = _wire_bytes(form.up_to_merge.type_signature.parameter)
  partial = _wire_bytes(form.up_to_merge.type_signature.result)
  after_in = _wire_bytes(form.after_merge.type_signature.parameter)
  after_out = _wire_bytes(form.after_merge.type_signature.result)
  merges = num_subrounds - 1
  total = num_subrounds * (state_in + partial) + merges * 3 * partial + after_in + after_out
  return {"num_subrounds": num_subrounds, "up_to_merge_in": state_in,
          "partial_aggregate": partial, "merges": merges, "after_merge_in": after_in,
          "after_merge_out": after_out, "total": total}


def _placed_bytes(type_spec: tff.types.Type, placement: tff.framework.PlacementLiteral) -> int:
  """Bytes of the parts of `type_spec` placed at `placement`."""
  if isinstance(type_spec, tff.types.FederatedType):
    return type_bytes(type_spec.member) if type_spec.placement is placement else 0
  if isinstance(type_spec, tff.types.StructType):
    return sum(_placed_bytes(t, placement) for t in type_spec)
  return 0


def _flat_tensor_types(type_spec: tff.types.Type) -> list[tuple]:
  if isinstance(type_spec, tff.types.TensorType):
    return [(tuple(type_spec.shape), np.dtype(type_spec.dtype).str)]
  if isinstance(type_spec, tff.types.StructType):
    return [x for t in type_spec for x in _flat_tensor_types(t)]
  return [("other", str(type_spec))]


def _struct_equivalent(type_spec: tff.types.Type, target: tff.types.Type) -> bool:
  if isinstance(type_spec, tff.types.FederatedType):
    type_spec = type_spec.member
  return _flat_tensor_types(type_spec) == _flat_tensor_types(target)


def _contains_equivalent(type_spec: tff.types.Type, target: tff.types.Type) -> bool:
  """Whether a part of `type_spec` (client-placed) has `target`'s tensors."""
  if isinstance(type_spec, tff.types.FederatedType):
    return type_spec.placement is tff.CLIENTS and _struct_equivalent(type_spec, target)
  if isinstance(type_spec, tff.types.StructType):
    return any(_contains_equivalent(t, target) for t in type_spec)
  return False


def _intrinsic_calls(process: tff.learning.templates.LearningProcess,
                     weights_type: tff.types.Type) -> list[dict[str, Any]]:
  """Every broadcast and aggregation intrinsic call in `process.next`, sized."""
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
  return calls


def communication(process: tff.learning.templates.LearningProcess, *,
                  encoded_update: bool = False) -> dict[str, Any]:
  """Bytes each client receives and sends per round, from `process.next`'s intrinsics.

  Walks the building block of `process.next`: every broadcast intrinsic
  (`federated_broadcast`, ...) sends its server value to each client; every
  aggregation intrinsic (`federated_sum`, `federated_mean`, ...) takes each client's
  value. The model's share is identified by type: the broadcast of the model weights
  (`process.get_model_weights`'s result type) and the aggregation of an update
  shaped like the trainable weights, or, with `encoded_update` (compressed uploads),
  the largest aggregation.

  Returns:
    `broadcast`, `upload` (totals), `broadcast_model`, `upload_update`, the rest
    (`broadcast_other`, `upload_other`: optimizer hyper-parameters, robust
    aggregation norms and counts, client weight, metrics) and the intrinsic calls.
  """
  weights_type = process.get_model_weights.type_signature.result
  calls = _intrinsic_calls(process, weights_type)
  broadcast = sum(c["bytes"] for c in calls if c["direction"] == "broadcast")
  upload = sum(c["bytes"] for c in calls if c["direction"] == "upload")
  model_broadcast = [c for c in calls if c["direction"] == "broadcast" and c["model"]]
  model_upload = [c for c in calls if c["direction"] == "upload" and c["model"]]
  update = type_bytes(weights_type.trainable)
  if not model_upload and encoded_update:
    # A compressed update travels encoded (quantized, packed): the largest upload.
    model_upload = [max((c for c in calls if c["direction"] == "upload"),
                        key=lambda c: c["bytes"])]
    update = model_upload[0]["bytes"]
  if len(model_broadcast) != 1 or len(model_upload) != 1:
    raise ValueError(f"expected one model broadcast and one update aggregation, found "
                     f"{len(model_broadcast)} and {len(model_upload)}")
  return {"broadcast": broadcast, "upload": upload,
          "broadcast_model": model_broadcast[0]["bytes"], "upload_update": update,
          "broadcast_other": broadcast - model_broadcast[0]["bytes"],
          "upload_other": upload - update,
          "model_weights": type_bytes(weights_type),
          "intrinsics": [{k: c[k] for k in ("intrinsic", "direction", "bytes")} for c in calls]}


def _mode(c: dict[str, Any], note: str) -> dict[str, Any]:
  out = {k: c[k] for k in ("broadcast", "upload", "broadcast_model", "upload_update",
                           "broadcast_other", "upload_other")}
  out["total"] = c["broadcast"] + c["upload"]
  out["note"] = note
  return out


def bytes_per_client_round(*, cached: dict[str, Any], online: Optional[dict[str, Any]],
                           parameters: dict[str, int], lora: Optional[dict[str, Any]] = None,
                           lora_note: str = "",
                           compressed: Optional[dict[str, dict[str, Any]]] = None
                           ) -> dict[str, Any]:
  """The communication table: cached, LoRA + decoder, online and full-model fine-tuning.

  Full-model fine-tuning (every weight trained, as the published federated-SAM
  recipes do) is derived: all float32 weights both ways plus the online process's
  non-model traffic (the cached process's without `online`); no such process is built.
  """
  other = online if online is not None else cached
  full_weights = 4 * parameters["total"]
  full = {"broadcast": full_weights + other["broadcast_other"],
          "upload": full_weights + other["upload_other"],
          "broadcast_model": full_weights, "upload_update": full_weights,
          "broadcast_other": other["broadcast_other"], "upload_other": other["upload_other"]}
  table = {
      "cached": _mode(cached, "decoder-only: prompt encoder + mask decoder broadcast, "
                      "mask decoder update uploaded (from the process's type signatures)"),
      "full_model": _mode(full, "full-model fine-tuning: all float32 weights both ways "
                          "(derived: 4 bytes x parameters + the "
                          f"{'online' if online is not None else 'cached'} process's other "
                          "traffic)"),
      "parameters": dict(parameters),
      "intrinsics": {"cached": cached["intrinsics"]},
  }
  if online is not None:
    table["online"] = _mode(online, "online mode: frozen image encoder broadcast with the "
                            "decoder every round, mask decoder update uploaded (from the "
                            "process's type signatures)")
    table["intrinsics"]["online"] = online["intrinsics"]
  if lora is not None:
    table["lora"] = _mode(lora, f"LoRA + decoder ({lora_note}): adapters + prompt encoder + "
                          "mask decoder broadcast, adapters + mask decoder update uploaded; the "
                          "encoder's base weights stay on the sites (from the process's type "
                          "signatures)")
    table["intrinsics"]["lora"] = lora["intrinsics"]
  for name, c in (compressed or {}).items():
    table[name] = _mode(c, f"decoder-only with --update_compression={name}: the update "
                        "uploaded quantized and bit-packed (from the process's type signatures)")
    table["intrinsics"][name] = c["intrinsics"]
  return table
