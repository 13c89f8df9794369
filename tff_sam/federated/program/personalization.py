"""Personalization (`--personalize_steps`): each site fine-tunes the global model on its
own training images and keeps its own decoder.

After federated training, a site that wants the most from the federation adapts the
shared model to its own images with a few local steps (federated training followed by
local fine-tuning, the usual way to beat training alone: e.g. FLamby's local
fine-tuning, NVIDIA FLARE's Ditto example). Each site would run this on its own
machine, on data that never leaves it; here, as for the simulated clients, it runs
in this process, one site after another. It is plain local training (the clients'
TFF optimizer, loss and pipeline, on the Keras model), not a federated step.

Each site's personalized model is scored on its held-out evaluation client (the site's
own domain: `site_test_clients`) next to the global model on the same images, and
written to `personalized/<site>/` (a full model folder, as `model/`).

TFF's `build_personalization_eval_computation` runs this kind of fine-tuning inside a
federated computation but returns only metrics at the training resolution; users need
the personalized weights and scores at the original resolution, so it is not used.
"""

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam.data import datasets
from tff_sam.data import pipeline
from tff_sam.evaluation import heldout
from tff_sam.export import pretrained
from tff_sam.federated.learning import processes
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import losses
from tff_sam.models import sam as sam_lib

PERSONALIZED_DIR = "personalized"


def site_test_clients(config: config_lib.RunConfig, *, sites: Sequence[str],
                      test_clients: Sequence[str]) -> dict[str, str]:
  """Training site -> the held-out client its personalized model is scored on.

  `--site_test_clients` first, else the embedded data's own map, else the client of
  the site's own name; sites matched by none are left out.

  Raises:
    errors.ConfigError: `--site_test_clients` names an unknown site or client.
  """
  declared = dict(e.split(":") for e in config.site_test_clients)
  for site, client in declared.items():
    errors.require(site in sites, "site_test_clients",
                   f"names {site!r}, not a training site of this run ({', '.join(sites)})")
    errors.require(client in test_clients, "site_test_clients",
                   f"names {client!r}, not a held-out client of this run "
                   f"({', '.join(test_clients)})")
  known = {**datasets.declared_site_test_clients(data_dir=config.data_dir, data=config.data),
           **{s: s for s in sites if s in test_clients}, **declared}
  return {s: known[s] for s in sites if known.get(s) in test_clients}


class FineTuner:
  """Local fine-tuning of one Keras model with a `tff.learning.optimizers` optimizer
  (the clients' own), reused site after site: one compiled step, so nothing is traced
  again per site. (A Keras optimizer per site kept about 45 MB each alive in this
  process, even deleted; TFF's functional optimizers hold no state of their own.)

  Args:
    model: The model to train (its trainable weights).
    optimizer: E.g. `processes.build_optimizer("adam", lr)`; its state starts afresh
      in every `train`.
    loss_fn: (targets, model outputs) -> scalar loss.
  """

  def __init__(self, *, model: tf.keras.Model, optimizer: Any,
               loss_fn: Callable[[tf.Tensor, dict], tf.Tensor]):
    self.model, self.optimizer = model, optimizer
    self._specs = [tf.TensorSpec(v.shape, v.dtype) for v in model.trainable_weights]

    @tf.function(reduce_retracing=True)
    def step(x, y, state):
      with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
      grads = tape.gradient(loss, model.trainable_weights)
      state, weights = optimizer.next(state, model.trainable_weights, grads)
      for variable, value in zip(model.trainable_weights, weights):
        variable.assign(value)
      return loss, state

    self._step = step

  def reset(self, source: tf.keras.Model) -> None:
    """Starts over from `source`'s prompt-encoder/decoder weights."""
    decoder_lib.copy_prompt_decoder_weights(source, self.model)

  def train(self, dataset: tf.data.Dataset, *, steps: int) -> list[float]:
    """`steps` optimizer steps on `dataset`'s batches (repeated as needed), from a
    fresh optimizer state; returns each step's loss."""
    state, trace = self.optimizer.initialize(self._specs), []
    for batch in dataset.repeat().take(steps):
      loss, state = self._step(batch["x"], batch["y"], state)
      trace.append(float(loss))
    return trace


@dataclasses.dataclass(frozen=True)
class SiteData:
  """What personalization reads of a run.

  Attributes:
    sites: The training sites (clients with images to train on).
    counts: Each site's training images.
    spec: The training clients' pipeline (`tasks.Task.pipeline_spec`).
    bundle: The SAM model (architecture, and the exported model's base).
    evaluator: The central held-out evaluation.
    test_clients: Its evaluation clients.
  """

  sites: Sequence[str]
  counts: dict[str, int]
  spec: pipeline.PipelineSpec
  bundle: sam_lib.SamBundle
  evaluator: heldout.Evaluator
  test_clients: Sequence[str]


def personalize_sites(config: config_lib.RunConfig, *, global_model: tf.keras.Model,
                      global_scores: dict, data: SiteData, out: Path,
                      cache_dir: Optional[Path], log: Callable[[str], None]) -> dict:
  """Fine-tunes `global_model` (a `PromptMaskDecoder`) per site, scores and exports it.

  Args:
    config: The run's settings (`personalize_steps`, prompts, loss, client optimizer).
    global_model: The exported global model.
    global_scores: Evaluation prompt -> the global model's `EvalResult.to_dict()`
      (with `by_client`).
    data: The run's sites, pipeline, model and held-out evaluation.
    out: The run's folder (`personalized/<site>/` goes there).
    cache_dir: Passed to `pretrained.export_model`.
    log: Progress lines.

  Returns:
    `summary.json`'s `personalized`: `steps`, and per site its `test_client`, the
    first and last step's `train_loss` and, per evaluation prompt, the `global` and
    `personalized` scores on that client.
  """
  matched = site_test_clients(config, sites=data.sites, test_clients=data.test_clients)
  for site in sorted(set(data.sites) - set(matched)):
    log(f"  personalization: {site} has no held-out client of its own (pass "
        f"--site_test_clients={site}:<client>); left out")
  spec = dataclasses.replace(data.spec, progress_dir=None)
  model = decoder_lib.PromptMaskDecoder(data.bundle.config, prompt=config.prompt,
                                        train_iou_head=config.train_iou_head,
                                        sub_iterations=config.sub_iterations)
  tuner = FineTuner(model=model, optimizer=processes.build_optimizer(config.client_optimizer,
                                                                     config.client_lr),
                    loss_fn=losses.MaskLoss(config.loss,
                                            iou_weight=1.0 if config.train_iou_head else 0.0))
  sites = {}
  for site, client in matched.items():
    tuner.reset(global_model)
    trace = tuner.train(pipeline.client_dataset(
        tf.constant(pipeline.round_client_id(site, config.rounds + 1)), spec),
                        steps=config.personalize_steps)
    by_prompt = {}
    for mode in config.eval_prompt_list:
      mine = data.evaluator(model, eval_prompt=mode, client=client)
      by_prompt[mode] = {"global": global_scores[mode]["by_client"][client],
                         "personalized": {k: v for k, v in mine.to_dict().items()
                                          if k != "by_client"}}
      metric = config_lib.headline_metric(mode)
      log(f"  personalized {site} ({config.personalize_steps} steps on its "
          f"{data.counts[site]} images; held-out {client}, {mode} prompts): {metric} "
          f"{by_prompt[mode]['global'][metric]:.4f} -> {getattr(mine, metric):.4f}")
    pretrained.export_model(bundle=data.bundle, decoder=model,
                            out_dir=out / PERSONALIZED_DIR / site, cache_dir=cache_dir)
    sites[site] = {"test_client": client, "train_loss": [trace[0], trace[-1]],
                   "by_prompt": by_prompt}
  return {"steps": config.personalize_steps, "sites": sites}
