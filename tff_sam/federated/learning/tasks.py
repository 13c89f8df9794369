"""The one task builder: a config and a loaded model become TFF processes and state.

`build_task` is the only place where the program's training process, its federated
evaluation process, the initial state and the client pipelines are assembled; the
training program, the benchmark and the tests all call it, so a new execution
backend, aggregator or model variant changes this one function.

A `Task` holds:

* `training_process`: weighted FedAvg (`processes.build_training_process`) with the
  robust model aggregator configured by the run, composed with the clients' dataset
  computation, so `next(state, ids)` takes client ids (`pipeline.round_client_id`)
  and TFF builds each client's dataset from its manifest by id;
* `initial_state`: its initial state carrying the bundle's pretrained weights;
* `model` and `decoder`: a Keras model with the TFF model's weight structure
  (`PromptMaskDecoder`, `OnlineSamModel` in online mode, `AdaptedSamModel` with
  `--adapter=lora`) and its decoder part, which `load_state` fills from a state for
  central evaluation and export;
* optionally the federated evaluation (`build_fed_eval`) of held-out clients: every
  object of every held-out image prompted once with its exact box and fixed points,
  in chunks of `evaluation_chunk` prompts, the same prompts in every round.
"""

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam.data import pipeline
from tff_sam.data import preprocess
from tff_sam.federated.learning import aggregation
from tff_sam.federated.learning import privacy
from tff_sam.federated.learning import processes
from tff_sam.models import adapted as adapted_lib
from tff_sam.models import build
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import lora as lora_lib
from tff_sam.models import sam as sam_lib

# Prompts per federated-evaluation example (bounds its memory: with all ~195 prompts of
# a HeLa image in one example TFF's worker reached 18 GB).
EVAL_CHUNK = 16
# The client training loop of the program (`tff.learning.LoopImplementation`, lower
# case): TFF's default `dataset_reduce` measured several times slower per round and,
# in online mode at ViT-B size, twice the worker memory (BENCHMARKS.md).
LOOP_IMPLEMENTATION = "dataset_iterator"


@dataclasses.dataclass
class Task:
  """The TFF processes of one run and what goes with them (module docstring).

  Attributes:
    training_process: The composed training process (`next(state, client_ids)`).
    initial_state: Its initial state (pretrained weights unless built from an
      architecture only).
    pipeline_spec: The training clients' pipeline.
    model: Keras model with the TFF model's weight structure, or None when built
      from an architecture only.
    decoder: The `PromptMaskDecoder` part of `model` (the same object in cached
      mode), or None.
    evaluation_process: The composed federated evaluation process, or None.
    evaluation_state: Its initial state.
    evaluation_clients: Ids of the federated evaluation clients.
    validation_clients: Ids of the validation clients (their manifests next to the
      evaluation clients'; evaluated by the same process).
    evaluation_spec: Their pipeline.
    adapter: With `--adapter=lora`: the adapters' setup (`model` is then an
      `AdaptedSamModel`); else None.
  """

  training_process: Any
  initial_state: Any
  pipeline_spec: pipeline.PipelineSpec
  model: Optional[tf.keras.Model] = None
  decoder: Optional[tf.keras.Model] = None
  evaluation_process: Any = None
  evaluation_state: Any = None
  evaluation_clients: tuple[str, ...] = ()
  validation_clients: tuple[str, ...] = ()
  evaluation_spec: Optional[pipeline.PipelineSpec] = None
  adapter: Optional[adapted_lib.AdapterSetup] = None

  def load_state(self, state: Any) -> tf.keras.Model:
    """Puts the global model of a training `state` into `model`; returns `decoder`."""
    trainable, non_trainable = processes.weights_from_state(self.training_process, state)
    decoder_lib.assign_model_weights(self.model, trainable, non_trainable)
    return self.decoder

  def federated_evaluation(self, state: Any, clients: Optional[Sequence[str]] = None,
                           prefix: str = "fed_eval") -> dict[str, Optional[float]]:
    """`<prefix>_loss` and `<prefix>_dice` of the global model in a training `state`.

    Args:
      state: A training process state.
      clients: Evaluation clients with a manifest in the evaluation manifest folder
        (default `evaluation_clients`): the held-out test clients, or validation
        clients.
      prefix: The metrics' name prefix.

    Both None when there are no such clients.
    """
    clients = self.evaluation_clients if clients is None else clients
    if self.evaluation_process is None or not clients:
      return {f"{prefix}_loss": None, f"{prefix}_dice": None}
    eval_state = processes.with_model_weights(self.evaluation_process, self.evaluation_state,
                                              self.training_process, state)
    result = self.evaluation_process.next(
        eval_state, [pipeline.round_client_id(c, 0) for c in clients])
    m = processes.evaluation_metrics(result)
    return {f"{prefix}_loss": m["loss"], f"{prefix}_dice": m["dice"]}


def _spec(config: config_lib.RunConfig, *, sam_config: Any, manifest_dir: Path,
          normalization: Optional[preprocess.PixelNormalization],
          **overrides) -> pipeline.PipelineSpec:
  values = dict(
      prompt=config.prompt, prompts_per_image=config.prompts_per_image,
      box_jitter=config.box_jitter, box_jitter_fraction=config.box_jitter_fraction,
      num_points=config.num_points, num_negative_points=config.num_negative_points,
      sub_iterations=config.sub_iterations,
      local_epochs=config.local_epochs, batch_size=config.batch_size, seed=config.seed)
  values.update(overrides)
  return pipeline.build_pipeline_spec(sam_config=sam_config, manifest_dir=manifest_dir,
                                      normalization=normalization, **values)


def build_task(*, config: config_lib.RunConfig, client_ids: Sequence[str],
               manifest_dir: Path, bundle: Optional[sam_lib.SamBundle] = None,
               sam_config: Any = None, evaluation_clients: Sequence[str] = (),
               validation_clients: Sequence[str] = (),
               evaluation_manifest_dir: Optional[Path] = None,
               evaluation_chunk: int = EVAL_CHUNK,
               loop_implementation: str = LOOP_IMPLEMENTATION,
               progress_dir: Optional[Path] = None,
               site_weights: Optional[adapted_lib.SiteWeights] = None) -> Task:
  """Builds the run's processes, initial state and pipelines.

  Args:
    config: The run's settings (prompts, pipeline, optimizers, aggregation, online
      mode via `embedding_cache=False`).
    client_ids: The training clients (manifests `manifest_dir/<client>.txt`).
    manifest_dir: Folder of the training clients' manifests.
    bundle: The loaded model: architecture, processor and pretrained weights.
    sam_config: Instead of `bundle`: the architecture only (cached mode); the
      initial state then holds TFF's random initialization and `model` is None (the
      benchmark's memory runs need nothing more).
    evaluation_clients: Federated evaluation clients (manifests in
      `evaluation_manifest_dir`); none, and no validation clients = no evaluation
      process.
    validation_clients: Validation clients (manifests in the same folder).
    evaluation_manifest_dir: Folder of their manifests.
    evaluation_chunk: Prompts per federated evaluation example.
    loop_implementation: The client loop of the training process
      (`dataset_iterator`, the program's, or `dataset_reduce`, TFF's default).
    progress_dir: Where the training clients report their progress in a round
      (`pipeline.PipelineSpec.progress_dir`); None = no reports.
    site_weights: With `--adapter=lora`: the site copy of the encoder's base weights
      (`adapted.write_site_weights`). The clients' records then hold the encoder's
      activations where its first adapted stage starts (`--embedding_cache`) or
      images (online).

  Returns:
    The task.
  """
  if (bundle is None) == (sam_config is None):
    raise ValueError("pass exactly one of bundle and sam_config")
  online = not config.embedding_cache
  if bundle is None and online:
    raise ValueError("online mode needs the bundle (its encoder weights)")
  arch = bundle.config if bundle is not None else sam_config
  adapter = _adapter_setup(config, site_weights)
  shapes = dict(
      sam_config=arch,
      normalization=preprocess.pixel_normalization(bundle.processor) if online else None,
      feature_shape=adapter.feature_shape(arch) if adapter is not None else None)
  encoder = sam_lib.encoder_kind(bundle) if online and adapter is None else None

  def model_fn_for(spec: pipeline.PipelineSpec, ids: Sequence[str]):
    client_data = pipeline.build_client_data(ids, spec)
    model_fn = processes.build_model_fn(
        sam_config=arch, input_spec=client_data.element_type_structure, prompt=config.prompt,
        loss=config.loss, train_iou_head=config.train_iou_head, online_encoder=encoder,
        adapter=adapter, sub_iterations=config.sub_iterations)
    return model_fn, client_data

  spec = _spec(config, manifest_dir=manifest_dir, **shapes,
               progress_dir=None if progress_dir is None else str(Path(progress_dir).resolve()))
  model_fn, client_data = model_fn_for(spec, client_ids)
  training_process = processes.compose_with_client_data(
      processes.build_training_process(
          model_fn=model_fn, client_optimizer=config.client_optimizer,
          client_lr=config.client_lr,
          server_optimizer=processes.build_server_optimizer(
              name=config.server_optimizer, learning_rate=config.server_lr,
              momentum=config.server_momentum, beta_1=config.server_beta_1,
              beta_2=config.server_beta_2, epsilon=config.server_epsilon),
          model_aggregator=_model_aggregator(config, num_clients=len(client_ids)),
          loop_implementation=loop_implementation,
          algorithm=config.algorithm, proximal_strength=config.proximal_strength),
      client_data)
  task = Task(training_process=training_process, initial_state=None, pipeline_spec=spec,
              evaluation_clients=tuple(evaluation_clients),
              validation_clients=tuple(validation_clients), adapter=adapter)
  if evaluation_clients or validation_clients:
    task.evaluation_spec = _spec(
        config, manifest_dir=evaluation_manifest_dir, **shapes,
        prompts_per_image=evaluation_chunk, box_jitter=0.0, box_jitter_fraction=0.0,
        local_epochs=1, batch_size=1, evaluation=True,
        max_objects_per_image=config.eval_max_objects)
    eval_model_fn, eval_data = model_fn_for(task.evaluation_spec,
                                            [*evaluation_clients, *validation_clients])
    task.evaluation_process = processes.compose_with_client_data(
        processes.build_evaluation_process(model_fn=eval_model_fn), eval_data)
    task.evaluation_state = task.evaluation_process.initialize()
  # The Keras models come last: TFF builds its models in a legacy graph while tracing,
  # which invalidates Keras models made before (Keras 2.14, "invalid state").
  if bundle is None:
    task.initial_state = training_process.initialize()
    return task
  task.model, task.decoder = _keras_models(config, bundle=bundle, adapter=adapter)
  task.initial_state = processes.initial_state(
      training_process, *decoder_lib.model_weights_lists(task.model))
  return task


def _adapter_setup(config: config_lib.RunConfig, site_weights: Optional[adapted_lib.SiteWeights]
                   ) -> Optional[adapted_lib.AdapterSetup]:
  """With `--adapter=lora`: the adapters, their site copy and where they start; else None."""
  lora = lora_lib.spec_from_config(config)
  if lora is None:
    return None
  if site_weights is None:
    raise ValueError("--adapter=lora needs the site copy of the encoder (site_weights)")
  return adapted_lib.AdapterSetup(
      lora=lora, site=site_weights,
      start=adapted_lib.feature_start(site_weights.image_encoder,
                                      embedding_cache=config.embedding_cache))


def _model_aggregator(config: config_lib.RunConfig, *, num_clients: int):
  """The run's model aggregator (`aggregation.build_model_aggregator`), with client-level
  differential privacy when `--dp_noise_multiplier` is set."""
  dp_factory = None
  if config.differential_privacy:
    dp_factory = privacy.build_dp_factory(
        noise_multiplier=config.dp_noise_multiplier,
        clients_per_round=min(config.clients_per_round, num_clients),
        clip_norm=config.dp_clip_norm, target_quantile=config.dp_target_quantile,
        initial_norm=config.clipping_initial_norm)
  return aggregation.build_model_aggregator(
      zeroing=config.zeroing, zeroing_quantile=config.zeroing_quantile,
      zeroing_multiplier=config.zeroing_multiplier, clipping=config.clipping,
      clipping_quantile=config.clipping_quantile,
      clipping_initial_norm=config.clipping_initial_norm,
      secure_aggregation=config.secure_aggregation,
      update_compression=config.update_compression, dp_factory=dp_factory)


def _keras_models(config: config_lib.RunConfig, *, bundle: sam_lib.SamBundle,
                  adapter: Optional[adapted_lib.AdapterSetup]
                  ) -> tuple[tf.keras.Model, tf.keras.Model]:
  """(model, decoder): the Keras model with the TFF model's weight structure, and its
  `PromptMaskDecoder` part (the same object in cached mode)."""
  if adapter is not None:
    model = build.build_adapted_model(
        bundle, site=adapter.site, lora=adapter.lora, start=adapter.start,
        prompt=config.prompt, train_iou_head=config.train_iou_head, seed=config.seed)
    return model, model.decoder
  if not config.embedding_cache:
    model = build.build_online_model(bundle, prompt=config.prompt,
                                     train_iou_head=config.train_iou_head)
    return model, model.decoder
  model = build.build_prompt_mask_decoder(bundle, prompt=config.prompt,
                                          train_iou_head=config.train_iou_head)
  return model, model
