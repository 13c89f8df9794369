"""The TFF processes: weighted FedAvg over the prompt encoder + mask decoder (and, with
`--adapter=lora`, the image encoder's adapters), and federated evaluation.

`model_fn` builds the architecture from the SAM config only (TFF calls it several
times while building the process); pretrained weights go into the initial state with
`process.set_model_weights`. Only the mask decoder is trainable, so only its weights
are updated and aggregated; the frozen prompt encoder's few non-trainable weights are
broadcast with them.

The model aggregator is `aggregation.build_model_aggregator` (robust by default).
"""

from typing import Callable, Optional

import tensorflow as tf
import tensorflow_federated as tff

from tff_sam.federated.learning import aggregation
from tff_sam.models import adapted as adapted_lib
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import losses
from tff_sam.models import online as online_lib


def build_model_fn(*, sam_config, input_spec, prompt: str, loss: str,
                   train_iou_head: bool, online_encoder: Optional[str] = None,
                   adapter: Optional[adapted_lib.AdapterSetup] = None,
                   sub_iterations: int = 3) -> Callable[[], object]:
  """Returns a no-argument function building a fresh `tff.learning` model.

  Args:
    sam_config: The `SamConfig` (architecture only; weights are set later).
    input_spec: Element spec of a client dataset (`OrderedDict(x=..., y=...)`).
    prompt: Prompt mode of the model (`box`, `points`, `both`).
    loss: Loss name (see `losses`).
    train_iou_head: Train the IoU head with an MSE term, or freeze it.
    online_encoder: None: the model reads cached embeddings (`PromptMaskDecoder`).
      `vit` or `tinyvit`: online mode, the model holds that frozen image encoder
      and reads pixel values (`tff_sam.models.online.OnlineSamModel`).
    adapter: Instead of `online_encoder`: the image encoder with LoRA, its base
      weights read from the site copy (`tff_sam.models.adapted.AdaptedSamModel`);
      it reads pixel values or cached features (`adapter.start`).
    sub_iterations: Decoder passes per step with prompt `iterative`.
  """
  if adapter is not None and online_encoder:
    raise ValueError("pass online_encoder or adapter, not both")

  def model_fn():
    if adapter is not None:
      keras_model = adapted_lib.AdaptedSamModel(
          sam_config, encoder=adapter.site.image_encoder, lora=adapter.lora,
          site=adapter.site, start=adapter.start, prompt=prompt,
          train_iou_head=train_iou_head, sub_iterations=sub_iterations)
    elif online_encoder:
      keras_model = online_lib.OnlineSamModel(
          sam_config, encoder=online_encoder, prompt=prompt, train_iou_head=train_iou_head,
          sub_iterations=sub_iterations)
    else:
      keras_model = decoder_lib.PromptMaskDecoder(
          sam_config, prompt=prompt, train_iou_head=train_iou_head,
          sub_iterations=sub_iterations)
    return tff.learning.models.from_keras_model(
        keras_model,
        loss=losses.MaskLoss(loss, iou_weight=1.0 if train_iou_head else 0.0),
        input_spec=input_spec,
        metrics=[losses.MeanDice()])

  return model_fn


def build_optimizer(name: str, learning_rate: float):
  """A client's `tff.learning.optimizers` optimizer: `sgd` (plain, no momentum) or `adam`."""
  if name == "sgd":
    return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate)
  if name == "adam":
    return tff.learning.optimizers.build_adam(learning_rate=learning_rate)
  raise ValueError(f"unknown optimizer {name!r}")


def build_server_optimizer(*, name: str, learning_rate: float, momentum: float = 0.9,
                           beta_1: float = 0.9, beta_2: float = 0.99, epsilon: float = 1e-3):
  """The server's `tff.learning.optimizers` optimizer of the averaged update.

  Args:
    name: `sgd` (FedAvg at learning rate 1), `sgdm` (with `momentum`), `adam` or
      `yogi` (FedAdam, FedYogi of "Adaptive Federated Optimization", with `beta_1`,
      `beta_2` and `epsilon`, the adaptivity).
    learning_rate: The server learning rate.
    momentum: `sgdm`'s momentum.
    beta_1: `adam`'s and `yogi`'s first-moment decay.
    beta_2: Their second-moment decay.
    epsilon: Their epsilon.
  """
  optimizers = tff.learning.optimizers
  if name == "sgd":
    return optimizers.build_sgdm(learning_rate=learning_rate)
  if name == "sgdm":
    return optimizers.build_sgdm(learning_rate=learning_rate, momentum=momentum)
  moments = dict(learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)
  if name == "adam":
    return optimizers.build_adam(**moments)
  if name == "yogi":
    return optimizers.build_yogi(**moments)
  raise ValueError(f"unknown server optimizer {name!r}")


def build_training_process(*, model_fn, client_lr: float, server_optimizer,
                           client_optimizer: str = "adam",
                           model_aggregator=None,
                           loop_implementation: str = "dataset_iterator",
                           algorithm: str = "fedavg", proximal_strength: float = 0.0):
  """FedAvg or FedProx (`tff.learning.algorithms.build_{weighted,unweighted}_fed_{avg,prox}`).

  Clients run `client_optimizer` (Adam by default) at `client_lr` for their local
  epochs; the server applies the mean update with `server_optimizer`. The mean is example-weighted, unless `model_aggregator` is an
  unweighted factory (differential privacy): then every client counts once.
  FedProx adds `proximal_strength / 2 * ||w - w_global||^2` to each client's loss. The client loop iterates the dataset
  (`LoopImplementation.DATASET_ITERATOR`): TFF's default `dataset.reduce` loop
  measured several times slower per round and, in online mode at ViT-B size, about
  twice the worker memory (BENCHMARKS.md).

  Args:
    model_fn: See `build_model_fn`.
    client_lr: Client learning rate.
    server_optimizer: The server's optimizer (`build_server_optimizer`).
    client_optimizer: `adam` or `sgd` (plain, no momentum).
    model_aggregator: Aggregation factory (default
      `aggregation.build_model_aggregator()`).
    loop_implementation: The client loop, a `tff.learning.LoopImplementation` name
      in lower case (`dataset_iterator`, or TFF's default `dataset_reduce`, which the
      benchmark compares against).
    algorithm: `fedavg` or `fedprox`.
    proximal_strength: FedProx's mu.
  """
  aggregator = model_aggregator or aggregation.build_model_aggregator()
  weighted = not isinstance(aggregator, tff.aggregators.UnweightedAggregationFactory)
  algorithms = tff.learning.algorithms
  common = dict(client_optimizer_fn=build_optimizer(client_optimizer, client_lr),
                server_optimizer_fn=server_optimizer,
                model_aggregator=aggregator,
                loop_implementation=tff.learning.LoopImplementation[loop_implementation.upper()])
  if algorithm == "fedprox":
    build = algorithms.build_weighted_fed_prox if weighted else algorithms.build_unweighted_fed_prox
    return build(model_fn, proximal_strength=proximal_strength, **common)
  if algorithm != "fedavg":
    raise ValueError(f"unknown algorithm {algorithm!r}")
  build = algorithms.build_weighted_fed_avg if weighted else algorithms.build_unweighted_fed_avg
  return build(model_fn, **common)


def build_evaluation_process(*, model_fn):
  """Federated evaluation (`tff.learning.algorithms.build_fed_eval`) of `model_fn`."""
  return tff.learning.algorithms.build_fed_eval(
      model_fn, loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR)


def evaluation_metrics(result) -> dict[str, float]:
  """`loss`, `dice` and `num_examples` of a federated evaluation round's output."""
  m = result.metrics["client_work"]["eval"]["current_round_metrics"]
  return {"loss": float(m["loss"]), "dice": float(m["dice"]),
          "num_examples": int(m["num_examples"])}


def compose_with_client_data(process, client_data):
  """A process whose `next` takes client ids and builds their datasets in TFF."""
  return tff.simulation.compose_dataset_computation_with_learning_process(
      client_data.dataset_computation, process)


def with_model_weights(process, state, source_process, source_state):
  """`state` of `process` carrying the global model of `source_state`."""
  return process.set_model_weights(state, source_process.get_model_weights(source_state))


def initial_state(process, trainable, non_trainable):
  """The process's initial state carrying the given (pretrained) model weights."""
  state = process.initialize()
  return process.set_model_weights(
      state, tff.learning.models.ModelWeights(trainable=list(trainable),
                                              non_trainable=list(non_trainable)))


def weights_from_state(process, state) -> tuple[list, list]:
  """(trainable, non_trainable) numpy weights of the global model in `state`."""
  w = process.get_model_weights(state)
  return [tf.convert_to_tensor(v).numpy() for v in w.trainable], [
      tf.convert_to_tensor(v).numpy() for v in w.non_trainable]
