"""The federated fine-tuning program: data -> cache -> TFF rounds -> evaluation -> export.

The platform wiring of `program_logic.train_model`: the run's folder (`run_folder`),
data, the model and where TFF runs (`federated.backends`), in phases (`_run_experiment`).
No flags here: `run_experiment` takes one validated `RunConfig` (the binary in
`tff_sam.experiments.run` builds it from flags) and writes into `output_dir`:

* `config.json`: the config;
* `state/round_<N>/`: the server state after round N (TFF `FileProgramStateManager`,
  the last few kept); re-running the same command resumes from the newest one;
* `clients/<client>.txt`: each client's images (what it trains on), one line per
  image: the source image path, a tab, its cached record;
  `eval_clients/<client>.txt`: the same for the held-out evaluation clients;
* `metrics.csv` and `tensorboard/`: one row (TensorBoard step) per round, released
  through TFF release managers (`releases`); round 0 is the zero-shot
  baseline. Columns (`METRIC_DOCS`): training loss/Dice, central held-out Dice/IoU
  (also per evaluation client), federated evaluation loss/Dice, robust-aggregation
  counts, seconds;
* `summary.json`: `config`, `baseline` and `final` (`dice`, `iou`, per evaluation
  client, federated evaluation), `rounds`, `aggregation` totals, data and cache
  counts, `invocations` (each command that worked on the run: start, rounds done,
  seconds) and `wall_time_s` (their total);
* `invocations.json`: the same list, kept up to date while the run is going;
* `model/`: the fine-tuned model (`TFSamModel.save_pretrained`); with `--adapter=lora`
  its image encoder carries the merged adapters and `model/adapter/` holds them alone;
* `metrics.png`: loss and held-out Dice per round;
* `overlays/`: image | ground truth | zero-shot | fine-tuned, for fixed test objects
  (also as TensorBoard images);
* with `--personalize_steps`: `personalized/<site>/`, each site's fine-tuned model
  (`personalization`), and its scores in `summary.json` (`personalized`).
"""

import collections
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam.data import cache
from tff_sam.data import discovery
from tff_sam.data import pipeline
from tff_sam import errors
from tff_sam import output_folder
from tff_sam.evaluation import heldout
from tff_sam.evaluation import plots
from tff_sam.export import pretrained
from tff_sam.federated.backends import execution
from tff_sam.federated.backends import failures
from tff_sam.federated.backends import local_worker
from tff_sam.federated.backends import remote_workers
from tff_sam.federated.backends import tf_execution
from tff_sam.federated.learning import aggregation
from tff_sam.federated.learning import privacy
from tff_sam.federated.learning import processes
from tff_sam.federated.learning import tasks
from tff_sam.federated.program import best_model
from tff_sam.federated.program import personalization
from tff_sam.federated.program import program_logic
from tff_sam.federated.program import progress as progress_lib
from tff_sam.federated.program import releases
from tff_sam.federated.program import run_data
from tff_sam.federated.program import run_folder
from tff_sam import fileio
from tff_sam.models import adapted
from tff_sam.models import build
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import sam as sam_lib

def sample_clients(client_ids: list[str], *, round_num: int, clients_per_round: int,
                   seed: int) -> list[str]:
  """Clients of one round: uniform without replacement, a function of (seed, round)."""
  rng = np.random.default_rng([seed, round_num])
  k = min(clients_per_round, len(client_ids))
  return sorted(rng.choice(client_ids, size=k, replace=False).tolist())


def _central_metrics(result: heldout.EvalResult, eval_clients: list[str]
                     ) -> dict[str, Optional[float]]:
  out = {"test_dice": result.dice, "test_iou": result.iou, "test_msa": result.msa,
         "test_sa50": result.sa50}
  if len(eval_clients) > 1:
    for c in eval_clients:
      out[f"test_dice/{c}"] = result.by_client.get(c, {}).get("dice")
  return out


def run_experiment(config: config_lib.RunConfig, *, fresh: bool = False,
                   log: Callable[[str], None] = print) -> dict:
  """Runs federated fine-tuning as configured and writes the outputs.

  If `output_dir` holds a run started with the same settings, it is resumed from its
  newest saved round: client sampling and prompts are functions of (seed, round), so
  the result equals an uninterrupted run's. Every file is written atomically; the
  metrics of a round are released before its state is saved, and releasing round N
  drops rows >= N, so `metrics.csv` has each round exactly once.

  Args:
    config: A validated run configuration.
    fresh: Discard a previous run in `output_dir` instead of resuming it.
    log: Where progress lines go.

  Returns:
    The summary (also written to `summary.json`).

  Raises:
    errors.UserError: Bad data, model or settings (one-line message), or a backend
      failure (`failures.user_errors`): the local worker died (e.g. out of memory;
      TFF itself would retry the round forever), a remote worker was lost or failed,
      or the device ran out of memory; `output_dir` cannot be written or another
      command holds it (`output_folder.claim`).
  """
  config.validate()
  with output_folder.claim(config.output_dir) as out, output_folder.writing_errors(out):
    return _run_in_folder(config, out, fresh=fresh, log=log)


def _run_in_folder(config: config_lib.RunConfig, out: Path, *, fresh: bool,
                   log: Callable[[str], None]) -> dict:
  """`run_experiment` in its claimed folder `out`: resume, report complete, or run."""
  local_worker.end_orphaned_local_workers(out / run_folder.WORKERS_FILE)
  versions = [] if fresh else run_folder.saved_versions(out)
  if versions or (config.rounds == 0 and not fresh):
    if versions:
      run_folder.check_resumable(out, config, versions)
    done = run_folder.completed_summary(out, config, versions)
    if done is not None:
      log(f"{out}: this run is complete ({config.rounds} rounds; held-out test dice "
          f"zero-shot {done['baseline']['dice']:.4f} -> fine-tuned {done['final']['dice']:.4f}); "
          "nothing to do (--fresh redoes it, a larger --rounds continues it)")
      return done
  progress = {"section": "setup"}
  with failures.user_errors(progress, pid_file=out / run_folder.WORKERS_FILE):
    try:
      return _run_experiment(config, out=out, versions=versions, log=log, progress=progress)
    finally:  # Its graphs and sessions (`tf`): a process may run more programs (compare).
      execution.release_computations()


def _check_clients_per_round(config: config_lib.RunConfig, available: int, what: str) -> None:
  errors.require(
      config.clients_per_round <= available, "clients_per_round",
      f"is {config.clients_per_round} but there are only {available} {what} (pass "
      f"--clients_per_round={available} or fewer; with a flat --data_dir, --num_clients "
      "sets how many clients it is split into)")


@dataclasses.dataclass
class _Run:
  """What the phases of one invocation of a run share (`_run_experiment`).

  Attributes:
    config: The settings.
    out: The run's folder.
    versions: The saved rounds it resumes from (empty: a fresh start).
    progress: `progress["section"]` names what the run is doing.
    log: Where progress lines go.
    start: `time.time()` when this invocation's work began.
    invocations: `invocations.json`: the earlier commands' entries, then this one's.
  """

  config: config_lib.RunConfig
  out: Path
  versions: list[int]
  progress: dict[str, str]
  log: Callable[[str], None]
  start: float = dataclasses.field(default_factory=time.time)
  invocations: list[dict] = dataclasses.field(default_factory=list)

  @property
  def cache_root(self) -> Path:
    """The shared cache (`--cache_dir`, else the default)."""
    return (Path(self.config.cache_dir).expanduser() if self.config.cache_dir
            else fileio.default_cache_dir())

  def record_invocation(self, **fields) -> None:
    """Updates this command's entry (and its wall time) in `invocations.json`."""
    self.invocations[-1].update(fields, wall_time_s=round(time.time() - self.start, 2))
    fileio.write_json(self.out / run_folder.INVOCATIONS_FILE, self.invocations)


@dataclasses.dataclass
class _TrainingData:
  """A run's data, model and cached records (`_prepare_training_data`).

  Attributes:
    splits: The training clients and the held-out evaluation clients.
    bundle: The SAM model.
    site: With `--adapter=lora`, this site's copy of the encoder's base weights.
    records: The cached records of every image.
    counts: Each training client's images with objects (its manifest in `clients/`).
    client_ids: The training clients with at least one.
  """

  splits: discovery.DatasetSplits
  bundle: sam_lib.SamBundle
  site: Optional[adapted.SiteWeights]
  records: run_data.RunRecords
  counts: dict[str, int]
  client_ids: list[str]


@dataclasses.dataclass
class _HeldOut:
  """A run's held-out evaluation (`_prepare_held_out`).

  Attributes:
    evaluator: The central evaluation at the original resolution.
    eval_prompt: The prompts of every round's evaluation (the first `--eval_prompts`).
    eval_clients: The evaluation clients with held-out records.
    fed_clients: Those with objects: the federated evaluation's clients.
    val_clients: With validation: the validation clients with objects (manifests
      `eval_clients/val.<client>.txt`).
    validation: Whether the run has validation images (`--validation_fraction` or
      the data's `val/` folder): validated every evaluation round, chosen on.
    chunk: The federated evaluation's objects per chunk.
    keeper: With `--keep_best`, the best evaluated round's weights.
    last_eval: The newest evaluated round's result, reused at the end.
  """

  evaluator: heldout.Evaluator
  eval_prompt: str
  eval_clients: list[str]
  fed_clients: list[str]
  val_clients: list[str]
  validation: bool
  chunk: int
  keeper: Optional[best_model.BestModelKeeper]
  last_eval: dict[int, heldout.EvalResult] = dataclasses.field(default_factory=dict)


def _run_experiment(config: config_lib.RunConfig, *, out: Path, versions: list[int],
                    log: Callable[[str], None], progress: dict[str, str]) -> dict:
  """`run_experiment`'s body, phase by phase; keeps `progress["section"]` up to date.

  `versions` are the saved rounds to resume from (empty: start fresh).
  """
  run = _Run(config=config, out=out, versions=versions, progress=progress, log=log)
  _start_invocation(run)
  try:
    return _run_phases(run)
  except BaseException as e:  # Ctrl-C, SIGTERM (`runtime.run_job`), an error: how far it got.
    how = ({"interrupted": True} if isinstance(e, KeyboardInterrupt) else
           {"error": str(e) if isinstance(e, errors.UserError) else type(e).__name__})
    with contextlib.suppress(OSError):  # E.g. the disk is full: the error says so.
      run.record_invocation(rounds_done=max(run_folder.saved_versions(run.out), default=0),
                            **how)
    raise


def _run_phases(run: _Run) -> dict:
  """Data, task, rounds, evaluation, export and summary of a started invocation."""
  config = run.config
  data = _prepare_training_data(run)
  held_out = _prepare_held_out(run, data)
  task = _build_task(run, data, held_out)
  epsilon_of, privacy_setup = _privacy_setup(run, data)
  state = _Rounds(run, data=data, held_out=held_out, task=task, epsilon_of=epsilon_of).train()
  results, fine_tuned = _evaluate_exported(run, state=state, data=data, held_out=held_out,
                                           task=task)
  overlays = _export(run, fine_tuned=fine_tuned, data=data, held_out=held_out, task=task)
  extra = ({"privacy": {**privacy_setup, "epsilon": epsilon_of(config.rounds)}}
           if epsilon_of is not None else {})
  if config.personalize_steps:
    run.progress["section"] = "personalization"
    extra["personalized"] = personalization.personalize_sites(
        config, global_model=fine_tuned, global_scores=results["evaluation"]["by_prompt"],
        data=personalization.SiteData(
            sites=data.client_ids, counts=data.counts, spec=task.pipeline_spec,
            bundle=data.bundle, evaluator=held_out.evaluator,
            test_clients=held_out.eval_clients),
        out=run.out, cache_dir=run.cache_root, log=run.log)
  return _write_summary(run, results=results, overlays=overlays, data=data, held_out=held_out,
                        extra=extra)


def _start_invocation(run: _Run) -> None:
  """Starts the run afresh or resumes it: `config.json`, where it runs, and this
  command's entry in `invocations.json`."""
  config, out, versions = run.config, run.out, run.versions
  if not versions:
    run_folder.start_fresh(out)
  elif duplicated := run_folder.rewrite_saved_metrics(out, max(versions)):  # As saved.
    run.log(f"  metrics.csv had round(s) {', '.join(map(str, duplicated))} more than once; "
            "kept the last row of each")
  fileio.write_text(out / "config.json", config.to_json() + "\n")
  run.log(remote_workers.describe_workers(config.workers, config.num_subrounds)
          if config.workers else execution.describe_execution(config.execution))
  if config.execution == config_lib.TF_EXECUTION and config.clients_per_subround:
    run.log(f"  --clients_per_subround={config.clients_per_subround} has no effect under "
            "--execution=tf: its clients are accumulated one at a time anyway")
  run.invocations = run_folder.begin_invocation(out, versions)
  run.record_invocation()


def _prepare_training_data(run: _Run) -> _TrainingData:
  """Finds and splits the data, loads the model, caches every image's record and
  writes the training clients' manifests (`clients/`)."""
  config, cache_root, log = run.config, run.cache_root, run.log
  skipped = collections.Counter()
  splits = run_data.prepare_data(config, cache_root, skipped)
  log(f"data: {len(splits.clients)} clients ({'sites' if splits.natural else config.partition}), "
      f"{splits.num_train_examples} training images, {len(splits.test)} test images in "
      f"{len(splits.test_clients)} held-out evaluation client(s)" + (
          f", {sum(map(len, splits.validation.values()))} validation images"
          if splits.validation else ""))
  _check_clients_per_round(config, len(splits.clients), "clients in the data")
  bundle = build.load_sam(config.model, cache_dir=cache_root)
  log(f"model: {config.model} (encoder fingerprint {bundle.fingerprint})")
  site, feature_start = None, None
  if config.adapter == config_lib.LORA_ADAPTER:
    site = adapted.write_site_weights(bundle, cache_root=cache_root)
    feature_start = adapted.feature_start(site.image_encoder,
                                          embedding_cache=config.embedding_cache)
  records = run_data.cache_records(config, splits, bundle, cache_root, skipped, log,
                                   feature_start=feature_start)
  counts = cache.write_manifests(run.out / "clients", records.clients)
  client_ids = [c for c, n in counts.items() if n > 0]
  if not client_ids:
    raise errors.DataError(run.out / "clients",
                           "no client has an image with objects to train on")
  _check_clients_per_round(config, len(client_ids), "clients with objects to train on")
  return _TrainingData(splits=splits, bundle=bundle, site=site, records=records,
                       counts=counts, client_ids=client_ids)


def _prepare_held_out(run: _Run, data: _TrainingData) -> _HeldOut:
  """The held-out records by evaluation client (`eval_clients/`; skipped examples have
  no record), the central evaluator and, with `--keep_best`, the kept best round."""
  config, out, records = run.config, run.out, data.records
  client_of = {id(e): c for c, exs in data.splits.test_clients.items() for e in exs}
  test_clients = [client_of[id(r.example)] for r in records.test]
  eval_clients = sorted(set(test_clients))
  fed_records = {c: [r for r, rc in zip(records.federated_test, test_clients) if rc == c]
                 for c in eval_clients}
  fed_counts = cache.write_manifests(out / "eval_clients", fed_records)
  val_records = {f"{run_folder.VALIDATION_PREFIX}.{c}": recs for c, recs in records.validation.items()}
  val_counts = cache.write_manifests(out / "eval_clients", val_records)
  objects = [r.num_objects for recs in (*fed_records.values(), *val_records.values())
             for r in recs]
  evaluator = heldout.Evaluator(
      examples=[r.example for r in records.test], records=records.test, bundle=data.bundle,
      binary_components=config.binary_components,
      max_objects_per_image=config.eval_max_objects, clients=test_clients,
      corrections=config.eval_corrections, automatic_settings=config.automatic_settings)
  if config.personalize_steps:  # `--site_test_clients` mistakes before round 0, not after.
    personalization.site_test_clients(config, sites=data.client_ids, test_clients=eval_clients)
  keeper = best_model.BestModelKeeper(out) if config.keep_best else None
  if keeper is not None and run.versions:
    rows = run_folder.read_metrics_csv(out / "metrics.csv")
    column = run_folder.selection_column(validation=bool(records.validation))
    keeper.restore(saved_round=max(run.versions), scores={
        int(r["round"]): run_folder.parse_metric(r.get(column)) for r in rows
        if run_folder.parse_metric(r.get(column)) is not None})
  return _HeldOut(evaluator=evaluator, eval_prompt=config.eval_prompt_list[0],
                  eval_clients=eval_clients,
                  fed_clients=[c for c, n in fed_counts.items() if n > 0],
                  val_clients=[c for c, n in val_counts.items() if n > 0],
                  validation=bool(records.validation),
                  chunk=min(tasks.EVAL_CHUNK, max(objects, default=1)), keeper=keeper)


def _build_task(run: _Run, data: _TrainingData, held_out: _HeldOut) -> tasks.Task:
  """The task (processes, initial state, pipelines), its rounds compiled now under `tf`
  so that what it cannot run fails before round 0."""
  out = run.out
  task = tasks.build_task(
      config=run.config, bundle=data.bundle, client_ids=data.client_ids,
      manifest_dir=out / "clients", evaluation_clients=held_out.fed_clients,
      validation_clients=held_out.val_clients,
      evaluation_manifest_dir=out / "eval_clients", evaluation_chunk=held_out.chunk,
      progress_dir=out / run_folder.PROGRESS_DIR, site_weights=data.site)
  if task.adapter is not None:
    run.log(adapted.describe_adapters(task.model, task.adapter.site))
  tf_execution.compile_computations(
      task.training_process.next,
      *([task.evaluation_process.next] if task.evaluation_process is not None else []))
  return task


def _privacy_setup(run: _Run, data: _TrainingData
                   ) -> tuple[Optional[Callable[[int], float]], dict]:
  """With differential privacy: rounds -> epsilon and the setup `summary.json` records
  (else None and {}); with secure aggregation, its example-weight bound checked."""
  config, client_ids = run.config, data.client_ids
  epsilon_of, privacy_setup = None, {}
  if config.differential_privacy:
    errors.require(len(client_ids) >= 2, "dp_noise_multiplier",
                   f"client-level differential privacy needs at least 2 training clients, "
                   f"got {len(client_ids)}: one client's data is the whole dataset")
    privacy_setup = privacy.describe_setup(config, num_clients=len(client_ids))
    epsilon_of = privacy.epsilon_fn(
        noise_multiplier=config.dp_noise_multiplier,
        clients_per_round=min(config.clients_per_round, len(client_ids)),
        num_clients=len(client_ids), delta=privacy_setup["delta"])
    run.log(privacy_setup.pop("line"))
  if config.secure_aggregation:
    heaviest = max(data.counts[c] for c in client_ids) * config.local_epochs
    errors.require(heaviest <= aggregation.SECURE_MAX_WEIGHT, "secure_aggregation",
                   f"a client trains on {heaviest} examples per round, more than the secure "
                   f"sum's example-weight bound {aggregation.SECURE_MAX_WEIGHT:.0f}")
  return epsilon_of, privacy_setup


def _with_embeddings(decoder: tf.keras.Model, *, task: tasks.Task, data: _TrainingData,
                     held_out: _HeldOut) -> tf.keras.Model:
  """`decoder`, evaluated on its adapted encoder's embeddings (`task.model`'s)."""
  if task.adapter is not None:
    held_out.evaluator.set_image_embeddings(decoder, heldout.adapted_embeddings(
        task.model, data.records.federated_test, pipeline_spec=task.pipeline_spec))
  return decoder


class _Rounds:
  """The round loop of a run: `program_logic.train_model` and its hooks (which clients,
  each round's training metrics, the held-out evaluation, the line after a round)."""

  def __init__(self, run: _Run, *, data: _TrainingData, held_out: _HeldOut, task: tasks.Task,
               epsilon_of: Optional[Callable[[int], float]]):
    self.run = run
    self.data = data
    self.held_out = held_out
    self.task = task
    self.epsilon_of = epsilon_of
    self.round_num = 0  # The round being trained (for its epsilon).

  def train(self):
    """Trains (or resumes) up to `config.rounds`; returns the last round's state."""
    run, config, task = self.run, self.run.config, self.task
    state, _ = program_logic.train_model(
        train_process=progress_lib.ReportingProcess(
            task.training_process, progress_dir=run.out / run_folder.PROGRESS_DIR,
            images=self.data.counts, spec=task.pipeline_spec, log=run.log),
        initial_state=task.initial_state,
        total_rounds=config.rounds, client_selection=self.select,
        round_metrics=self.train_metrics, evaluation=self.evaluate,
        evaluation_periodicity=config.eval_every,
        program_state_manager=run_folder.state_manager(run.out),
        metrics_release_manager=releases.build_release_manager(
            metrics_csv=run.out / "metrics.csv",
            tensorboard_dir=run.out / releases.TENSORBOARD_DIR),
        columns=run_folder.metric_columns(self.held_out.eval_clients,
                                          validation=self.held_out.validation),
        on_round=self.on_round,
        on_resume=lambda v: run.log(f"resuming {run.out} after round {v}/{config.rounds}"))
    return state

  def select(self, round_num: int) -> list[str]:
    self.run.progress["section"] = f"round {round_num}"
    self.round_num = round_num
    config = self.run.config
    sampled = sample_clients(self.data.client_ids, round_num=round_num,
                             clients_per_round=config.clients_per_round, seed=config.seed)
    return [pipeline.round_client_id(c, round_num) for c in sampled]

  def train_metrics(self, result) -> dict:
    train = result.metrics["client_work"]["train"]
    row = {"train_loss": float(train["loss"]), "train_dice": float(train["dice"]),
           **aggregation.aggregation_metrics(result.metrics["aggregator"])}
    if self.epsilon_of is not None:
      row["dp_epsilon"] = self.epsilon_of(self.round_num)
      if self.run.config.dp_clip_norm > 0:  # Fixed clipping: TFF's query reports no norm.
        row["clipping_norm"] = self.run.config.dp_clip_norm
    return row

  def evaluate(self, state, round_num: int) -> dict:
    """The round's validation (with validation images) and held-out test scores;
    offers the round to `--keep_best`."""
    config, held_out, task = self.run.config, self.held_out, self.task
    self.run.progress["section"] = (f"round {round_num}" if round_num
                                    else "round 0 (zero-shot evaluation)")
    row = {}
    if held_out.validation:
      self.run.log(f"  round {round_num}: validation (federated evaluation on "
                   f"{len(held_out.val_clients)} client(s))")
      row.update(task.federated_evaluation(state, held_out.val_clients,
                                           prefix=run_folder.VALIDATION_PREFIX))
    if (not held_out.validation or config.test_every_eval
        or round_num in (0, config.rounds)):
      row.update(self._evaluate_test(state, round_num))
    column = run_folder.selection_column(validation=held_out.validation)
    score = row.get(column)
    if held_out.keeper is not None and held_out.keeper.consider(
        round_num, score, processes.weights_from_state(task.training_process, state)):
      self.run.log(f"  round {round_num}: best {column} so far "
                   f"({score:.4f}), kept (--keep_best)")
    return row

  def _evaluate_test(self, state, round_num: int) -> dict:
    """The held-out test set: central (original resolution) and federated."""
    held_out, task = self.held_out, self.task
    self.run.log(f"  round {round_num}: held-out evaluation ({held_out.evaluator.num_objects} "
                 f"objects, {held_out.eval_prompt} prompts; federated evaluation on "
                 f"{len(held_out.fed_clients)} client(s))")
    decoder = _with_embeddings(task.load_state(state), task=task, data=self.data,
                               held_out=held_out)
    result = held_out.evaluator(decoder, eval_prompt=held_out.eval_prompt)
    held_out.last_eval.clear()
    held_out.last_eval[round_num] = result
    return {**_central_metrics(result, held_out.eval_clients),
            **task.federated_evaluation(state, held_out.fed_clients)}

  def on_round(self, round_num: int, row: dict) -> None:
    self.run.log(progress_lib.round_line(round_num, row, total=self.run.config.rounds,
                                         num_objects=self.held_out.evaluator.num_objects))
    self.run.record_invocation(rounds_done=round_num)


def _evaluate_exported(run: _Run, *, state, data: _TrainingData, held_out: _HeldOut,
                       task: tasks.Task) -> tuple[dict, tf.keras.Model]:
  """`metrics.csv` summarized, and the model to export evaluated on every
  `--eval_prompts`: the last round's, or with `--keep_best` the best round's.

  Returns:
    The results for `summary.json` and the model to export.
  """
  config, log, keeper = run.config, run.log, held_out.keeper
  run.progress["section"] = "export"
  results = run_folder.summarize_metrics(run_folder.read_metrics_csv(run.out / "metrics.csv"))
  fine_tuned = task.load_state(state)
  model_round = config.rounds
  if keeper is not None:  # --keep_best: the best evaluated round (round 0 included).
    results["best"] = {"round": keeper.round, "dice": keeper.score,
                       "metric": run_folder.selection_column(validation=held_out.validation)}
    if keeper.round != config.rounds:
      decoder_lib.assign_model_weights(task.model, *keeper.weights())
      model_round = keeper.round
      final = results["final"]["validation"] if held_out.validation else results["final"]
      log(f"--keep_best: exporting round {keeper.round} "
          f"({'validation' if held_out.validation else 'held-out'} dice {keeper.score:.4f}; "
          f"the last round, {config.rounds}, scored {final['dice']:.4f})")
  fine_tuned = _with_embeddings(fine_tuned, task=task, data=data, held_out=held_out)
  by_prompt = {}  # The exported model on every evaluation prompt.
  for mode in config.eval_prompt_list:
    run.progress["section"] = f"final evaluation ({mode} prompts)"
    r = (held_out.last_eval.get(model_round) if mode == held_out.eval_prompt
         else None) or held_out.evaluator(fine_tuned, eval_prompt=mode)
    by_prompt[mode] = r.to_dict()
    log(f"  exported model (round {model_round}), {mode} prompts: {r.scores_line()}")
  results["evaluation"] = {"model_round": model_round, "by_prompt": by_prompt}
  return results, fine_tuned


def _export(run: _Run, *, fine_tuned: tf.keras.Model, data: _TrainingData,
            held_out: _HeldOut, task: tasks.Task) -> list[Path]:
  """Writes `model/`, `metrics.png` and the overlays (also as TensorBoard images);
  returns the overlays' paths."""
  out = run.out
  run.progress["section"] = "export"
  pretrained.export_model(bundle=data.bundle, decoder=fine_tuned, out_dir=out / "model",
                          cache_dir=run.cache_root,
                          adapted=task.model if task.adapter is not None else None)
  plots.plot_metrics(out / "metrics.csv", out / "metrics.png")
  overlays = plots.write_overlays(out / "overlays", evaluator=held_out.evaluator,
                                  zero_shot_model=build.build_prompt_mask_decoder(data.bundle),
                                  fine_tuned_model=fine_tuned, eval_prompt=held_out.eval_prompt)
  releases.write_tensorboard_images(out / releases.TENSORBOARD_DIR, overlays,
                                    step=run.config.rounds)
  return overlays


def _write_summary(run: _Run, *, results: dict, overlays: list[Path], data: _TrainingData,
                   held_out: _HeldOut, extra: dict) -> dict:
  """Finishes this command's invocation and writes `summary.json`; returns the summary."""
  config, out, evaluator = run.config, run.out, held_out.evaluator
  run.record_invocation(finished=True)
  summary = {
      "config": config.to_dict(),
      **results,
      "num_test_objects": evaluator.num_objects,
      "evaluation_clients": held_out.eval_clients,
      "federated_evaluation_clients": held_out.fed_clients,
      "rounds": config.rounds,
      **extra,
      "clients": data.counts,
      "cache": vars(data.records.stats),
      "overlays": [str(p.relative_to(out)) for p in overlays],
      "invocations": run.invocations,
      "wall_time_s": round(sum(i["wall_time_s"] for i in run.invocations), 2),
  }
  fileio.write_json(out / "summary.json", summary)
  baseline, model_round = results["baseline"], results["evaluation"]["model_round"]
  exported = results["evaluation"]["by_prompt"][held_out.eval_prompt]
  run.log(f"held-out test dice ({held_out.eval_prompt} prompts): zero-shot "
          f"{baseline['dice']:.4f} -> fine-tuned {exported['dice']:.4f}  (iou "
          f"{baseline['iou']:.4f} -> {exported['iou']:.4f}, mSA {baseline['msa']:.4f} -> "
          f"{exported['msa']:.4f}, {evaluator.num_objects} objects"
          + (f"; round {model_round} kept by --keep_best" if model_round != config.rounds
             else "") + ")")
  run.log(f"outputs in {out}: metrics.csv, metrics.png, summary.json, model/, overlays/, "
          f"{releases.TENSORBOARD_DIR}/"
          + (f", {personalization.PERSONALIZED_DIR}/" if "personalized" in extra else ""))
  return summary
