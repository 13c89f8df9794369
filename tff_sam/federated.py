"""The TFF learning process: weighted FedAvg over the prompt encoder + mask decoder.

`model_fn` builds the architecture from the SAM config only (TFF calls it several
times while building the process); pretrained weights go into the initial state with
`process.set_model_weights`. Only the mask decoder is trainable, so only its weights
are updated and aggregated; the frozen prompt encoder's few non-trainable weights are
broadcast with them.
"""

from typing import Callable

import tensorflow as tf

from tff_sam import losses
from tff_sam import model as model_lib


def build_model_fn(*, sam_config, input_spec, prompt: str, loss: str,
                   train_iou_head: bool) -> Callable[[], object]:
  """Returns a no-argument function building a fresh `tff.learning` model.

  Args:
    sam_config: The `SamConfig` (architecture only; weights are set later).
    input_spec: Element spec of a client dataset (`OrderedDict(x=..., y=...)`).
    prompt: Prompt mode of the model (`box`, `points`, `both`).
    loss: Loss name (see `losses`).
    train_iou_head: Train the IoU head with an MSE term, or freeze it.
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  def model_fn():
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


def build_training_process(*, model_fn, client_lr: float, server_optimizer: str,
                           server_lr: float):
  """Weighted FedAvg (`tff.learning.algorithms.build_weighted_fed_avg`).

  Clients run Adam at `client_lr` for their local epochs; the server applies the
  example-weighted mean update with `server_optimizer` at `server_lr`.
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  return tff.learning.algorithms.build_weighted_fed_avg(
      model_fn,
      client_optimizer_fn=build_optimizer("adam", client_lr),
      server_optimizer_fn=build_optimizer(server_optimizer, server_lr))


def compose_with_client_data(process, client_data):
  """A process whose `next` takes client ids and builds their datasets in TFF."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  return tff.simulation.compose_dataset_computation_with_learning_process(
      client_data.dataset_computation, process)


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
