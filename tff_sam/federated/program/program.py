"""The federated fine-tuning program: data -> cache -> TFF rounds -> evaluation -> export.

The platform wiring of `program_logic.train_model`: files, data, the model and TFF's
worker. No flags here: `run_experiment` takes one validated `RunConfig` (the binary in
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
  (also as TensorBoard images).
"""

import asyncio
import collections
import csv
import dataclasses
import datetime
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tensorflow_federated as tff

from tff_sam import config as config_lib
from tff_sam.data import cache
from tff_sam.data import pipeline
from tff_sam import errors
from tff_sam.evaluation import heldout
from tff_sam.evaluation import plots
from tff_sam.export import pretrained
from tff_sam.federated.backends import execution
from tff_sam.federated.backends import remote_workers
from tff_sam.federated.backends import tf_execution
from tff_sam.federated.learning import aggregation
from tff_sam.federated.learning import privacy
from tff_sam.federated.learning import processes
from tff_sam.federated.learning import tasks
from tff_sam.federated.program import best_model
from tff_sam.federated.program import program_logic
from tff_sam.federated.program import progress as progress_lib
from tff_sam.federated.program import releases
from tff_sam.federated.program import run_data
from tff_sam import fileio
from tff_sam.models import adapted
from tff_sam.models import build
from tff_sam.models import decoder as decoder_lib

# Columns of metrics.csv ("<name>/<client>" columns are per evaluation client).
METRIC_DOCS = {
    "train_loss": "clients' mean training loss (example-weighted)",
    "train_dice": "clients' mean training Dice (low resolution, jittered prompts)",
    "test_dice": "central held-out Dice at the original resolution (all test objects)",
    "test_iou": "central held-out IoU",
    "test_msa": "central held-out mSA (micro-sam's segmentation accuracy, IoU 0.5:0.95), "
                "mean over images",
    "test_sa50": "central held-out segmentation accuracy at IoU 0.5",
    "test_dice/<client>": "the same over one evaluation client's images",
    "fed_eval_loss": "federated evaluation (build_fed_eval) on the held-out clients: loss",
    "fed_eval_dice": "federated evaluation: Dice at low resolution, exact prompts",
    "nonfinite_clients": "clients whose update held NaN/Inf (weight 0, ignored)",
    "zeroed_clients": "clients whose update exceeded the zeroing threshold (zeroed)",
    "clipped_clients": "clients whose update was clipped to the clipping norm",
    "zeroing_norm": "zeroing threshold (max-abs) used this round",
    "clipping_norm": "L2 clipping norm used this round",
    "dp_epsilon": "with --dp_noise_multiplier: the privacy spent so far, epsilon at "
                  "summary.json's privacy.delta (RDP accountant)",
    "seconds": "wall time of the round, evaluation included",
}


def sample_clients(client_ids: list[str], *, round_num: int, clients_per_round: int,
                   seed: int) -> list[str]:
  """Clients of one round: uniform without replacement, a function of (seed, round)."""
  rng = np.random.default_rng([seed, round_num])
  k = min(clients_per_round, len(client_ids))
  return sorted(rng.choice(client_ids, size=k, replace=False).tolist())


STATE_DIR = "state"
STATE_PREFIX = "round_"
KEEP_STATES = 3
INVOCATIONS_FILE = "invocations.json"
WORKERS_FILE = ".tff_workers.json"  # This run's TFF workers (`execution.end_orphaned_workers`).
PROGRESS_DIR = ".progress"  # The clients' reports inside a round (`progress`).
# Settings that may differ between a run and its resumption: how a round executes,
# not what it computes (equal up to float summation order), and `rounds`, which may
# grow (the run continues).
RESUMABLE_DIFFERENCES = ("output_dir", "clients_per_subround", "execution", "rounds", "workers",
                         "worker_timeout")


def _read_metrics(path: Path) -> list[dict]:
  if not path.exists():
    return []
  with open(path) as f:
    return [dict(r) for r in csv.DictReader(f)]


def _state_manager(out: Path) -> tff.program.FileProgramStateManager:
  return tff.program.FileProgramStateManager(
      root_dir=str(out / STATE_DIR), prefix=STATE_PREFIX, keep_total=KEEP_STATES,
      keep_first=False)


def _saved_versions(out: Path) -> list[int]:
  """Complete saved rounds; removes temporary folders a crash left mid-save."""
  for leftover in (out / STATE_DIR).glob(f"{STATE_PREFIX}*_temp*"):
    shutil.rmtree(leftover, ignore_errors=True)
  for leftover in out.glob("metrics.csv_temp*"):  # CSVFileReleaseManager's temporary file
    leftover.unlink(missing_ok=True)
  versions = asyncio.run(_state_manager(out).get_versions())
  return list(versions or [])


def check_resumable(out: Path, config: config_lib.RunConfig, versions: list[int]) -> None:
  """Refuses to resume a run in `out` that was started with other settings.

  A setting the saved `config.json` lacks (it predates the setting) counts as its
  default.

  Args:
    out: The run's folder.
    config: The settings of this invocation.
    versions: The saved rounds in `out` (`_saved_versions`).

  Raises:
    errors.ConfigError: naming every differing flag.
  """
  saved_path = out / "config.json"
  if not saved_path.exists():
    return
  defaults = {f.name: f.default for f in dataclasses.fields(config_lib.RunConfig)}
  saved = {**defaults, **json.loads(saved_path.read_text())}
  current = config.to_dict()
  differing = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_DIFFERENCES and saved.get(k) != current.get(k))
  if differing:
    flags = ", ".join(f"--{k} (saved {saved.get(k)!r}, now {current.get(k)!r})" for k in differing)
    raise errors.ConfigError(
        differing[0], f"{out} holds a run with other settings: {flags}; rerun with the saved "
        "settings to resume, pass --fresh to start over, or choose another --output_dir")
  if versions and config.rounds < max(versions):
    raise errors.ConfigError(
        "rounds", f"{out} holds a run already {max(versions)} rounds long; --rounds "
        f"{config.rounds} cannot shorten it (pass --rounds >= {max(versions)} to continue, "
        "--fresh to start over, or choose another --output_dir)")


def _start_fresh(out: Path) -> None:
  """Removes a previous run's state and results (never the shared cache)."""
  for name in (STATE_DIR, "model", "overlays", "clients", "eval_clients",
               releases.TENSORBOARD_DIR, best_model.BEST_DIR):
    shutil.rmtree(out / name, ignore_errors=True)
  for name in ("metrics.csv", "metrics.png", "summary.json", "config.json", INVOCATIONS_FILE):
    (out / name).unlink(missing_ok=True)


def completed_summary(out: Path, config: config_lib.RunConfig,
                      versions: list[int]) -> Optional[dict]:
  """The summary of a finished run in `out` with `config`'s settings, else None.

  `versions` are the saved rounds in `out` (`_saved_versions`).

  Finished means: its state holds round `config.rounds`, and `summary.json` (written
  last, after the exported model) says it was written for that many rounds (a
  0-round run saves no state: its summary's settings must equal `config`'s).
  """
  try:
    summary = json.loads((out / "summary.json").read_text())
  except (OSError, ValueError):
    return None
  if summary.get("rounds") != config.rounds or not (out / "model" / "config.json").is_file():
    return None
  if config.rounds == 0:  # Nothing is saved for round 0: the summary must match.
    return summary if summary.get("config") == config.to_dict() else None
  if not versions or max(versions) != config.rounds:
    return None
  return summary


def _read_invocations(out: Path) -> list[dict]:
  try:
    entries = json.loads((out / INVOCATIONS_FILE).read_text())
  except (OSError, ValueError):
    return []
  return entries if isinstance(entries, list) else []


def _parse(value: Optional[str]) -> Optional[float]:
  return float(value) if value not in (None, "") else None


def _central_metrics(result: heldout.EvalResult, eval_clients: list[str]
                     ) -> dict[str, Optional[float]]:
  out = {"test_dice": result.dice, "test_iou": result.iou, "test_msa": result.msa,
         "test_sa50": result.sa50}
  if len(eval_clients) > 1:
    for c in eval_clients:
      out[f"test_dice/{c}"] = result.by_client.get(c, {}).get("dice")
  return out


def _empty_row(eval_clients: list[str]) -> dict[str, Optional[float]]:
  """A `metrics.csv` row with every column of `METRIC_DOCS` (per client if several)."""
  keys = [k for k in METRIC_DOCS if not k.endswith("/<client>")]
  if len(eval_clients) > 1:
    keys += [f"test_dice/{c}" for c in eval_clients]
  return dict.fromkeys(keys)


def _summarize_rows(rows: list[dict]) -> dict:
  """`baseline`, `final` and aggregation totals from the rows of `metrics.csv`."""
  evaluated = [r for r in rows if _parse(r.get("test_dice")) is not None]

  def scores(row):
    out = {"dice": _parse(row["test_dice"]), "iou": _parse(row["test_iou"]),
           "msa": _parse(row.get("test_msa")), "sa50": _parse(row.get("test_sa50")),
           "federated_eval": {"loss": _parse(row.get("fed_eval_loss")),
                              "dice": _parse(row.get("fed_eval_dice"))}}
    per_client = {k.split("/", 1)[1]: _parse(v) for k, v in row.items()
                  if k.startswith("test_dice/")}
    if per_client:
      out["dice_by_client"] = per_client
    return out

  totals = {k: int(sum(_parse(r.get(k)) or 0 for r in rows))
            for k in ("nonfinite_clients", "zeroed_clients", "clipped_clients")}
  return {"baseline": scores(rows[0]), "final": scores(evaluated[-1]), "aggregation": totals}


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
    errors.UserError: Bad data, model or settings (one-line message), or TFF's worker
      died (e.g. out of memory; TFF itself would retry the round forever).
  """
  config.validate()
  out = Path(config.output_dir).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  execution.end_orphaned_workers(out / WORKERS_FILE)
  versions = [] if fresh else _saved_versions(out)
  if versions or (config.rounds == 0 and not fresh):
    if versions:
      check_resumable(out, config, versions)
    done = completed_summary(out, config, versions)
    if done is not None:
      log(f"{out}: this run is complete ({config.rounds} rounds; held-out test dice "
          f"zero-shot {done['baseline']['dice']:.4f} -> fine-tuned {done['final']['dice']:.4f}); "
          "nothing to do (--fresh redoes it, a larger --rounds continues it)")
      return done
  progress = {"section": "setup"}
  with execution.worker_watched(progress, pid_file=out / WORKERS_FILE):
    try:
      return _run_experiment(config, versions=versions, log=log, progress=progress)
    except remote_workers.WorkerLost as e:
      raise errors.UserError(
          f"{e} during {progress['section']}; restart it there (python -m "
          "tff_sam.experiments.worker --port PORT) or remove it from --workers, then run the "
          "same command again: it resumes from the last saved round") from None
    except remote_workers.WorkerFailed as e:
      raise errors.UserError(f"{e} (during {progress['section']}); the README's 'Several "
                             "machines' says what a worker machine needs") from None
    except tf_execution.OutOfDeviceMemory as e:
      raise errors.UserError(
          f"out of device memory during {progress['section']} (--execution=tf: {e}); "
          "lower --batch_size or --prompts_per_image (or use --embedding_cache in online "
          "mode), then run the same command again: it resumes from the last saved "
          "round") from None
    finally:  # Its graphs and sessions (`tf`): a process may run more programs (compare).
      execution.release_computations()


def _check_saved_metrics(out: Path, version: int) -> None:
  """A saved state needs `metrics.csv` rows from round 0 on (they are released first)."""
  rows = [r for r in _read_metrics(out / "metrics.csv") if int(r["round"]) <= version]
  if not rows or rows[0]["round"] != "0":
    raise errors.DataError(out / STATE_DIR, "saved state is unreadable or metrics.csv lacks "
                           "its rounds; pass --fresh to start over")


def _check_clients_per_round(config: config_lib.RunConfig, available: int, what: str) -> None:
  errors.require(
      config.clients_per_round <= available, "clients_per_round",
      f"is {config.clients_per_round} but there are only {available} {what} (pass "
      f"--clients_per_round={available} or fewer; with a flat --data_dir, --num_clients "
      "sets how many clients it is split into)")


class _ReportingProcess:
  """The training process, reporting each round's progress while it runs."""

  def __init__(self, process, *, progress_dir: Path, images: dict[str, int],
               spec, log: Callable[[str], None]):
    self.process = process
    self.progress_dir = progress_dir
    self.images = images
    self.spec = spec
    self.log = log

  def next(self, state, client_ids: list[str]):
    per_round = {c: self.images[c.rsplit(pipeline.ROUND_SEPARATOR, 1)[0]] for c in client_ids}
    round_num = int(client_ids[0].rsplit(pipeline.ROUND_SEPARATOR, 1)[1]) if client_ids else 0
    with progress_lib.RoundProgress(
        progress_dir=self.progress_dir, round_num=round_num, batch_size=self.spec.batch_size,
        expected={c: pipeline.expected_batches(n, self.spec) for c, n in per_round.items()},
        images={c: n * self.spec.local_epochs for c, n in per_round.items()}, log=self.log):
      return self.process.next(state, client_ids)


def _run_experiment(config: config_lib.RunConfig, *, versions: list[int],
                    log: Callable[[str], None], progress: dict[str, str]) -> dict:
  """`run_experiment`'s body; keeps `progress["section"]` up to date.

  `versions` are the saved rounds to resume from (empty: start fresh).
  """
  start = time.time()
  out = Path(config.output_dir).expanduser()
  if not versions:
    _start_fresh(out)
  fileio.write_text(out / "config.json", config.to_json() + "\n")
  log(remote_workers.describe_workers(config.workers, config.num_subrounds)
      if config.workers else execution.describe_execution(config.execution))
  if config.execution == config_lib.TF_EXECUTION and config.clients_per_subround:
    log(f"  --clients_per_subround={config.clients_per_subround} has no effect under "
        "--execution=tf: its clients are accumulated one at a time anyway")
  invocations = _read_invocations(out) if versions else []
  invocation = {"started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "resumed_after_round": max(versions) if versions else None,
                "rounds_done": max(versions) if versions else 0, "wall_time_s": 0.0,
                "finished": False}
  invocations.append(invocation)

  def record_invocation(**fields) -> None:
    invocation.update(fields, wall_time_s=round(time.time() - start, 2))
    fileio.write_json(out / INVOCATIONS_FILE, invocations)

  record_invocation()
  cache_root = (Path(config.cache_dir).expanduser() if config.cache_dir
                else fileio.default_cache_dir())

  # Data, model, cache.
  skipped = collections.Counter()
  splits = run_data.prepare_data(config, cache_root, skipped)
  log(f"data: {len(splits.clients)} clients ({'sites' if splits.natural else config.partition}), "
      f"{splits.num_train_examples} training images, {len(splits.test)} test images in "
      f"{len(splits.test_clients)} held-out evaluation client(s)")
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
  counts = cache.write_manifests(out / "clients", records.clients)
  client_ids = [c for c, n in counts.items() if n > 0]
  if not client_ids:
    raise errors.DataError(out / "clients", "no client has an image with objects to train on")
  _check_clients_per_round(config, len(client_ids), "clients with objects to train on")

  # Held-out records by evaluation client (skipped examples have no record).
  client_of = {id(e): c for c, exs in splits.test_clients.items() for e in exs}
  test_clients = [client_of[id(r.example)] for r in records.test]
  eval_clients = sorted(set(test_clients))
  fed_records = {c: [r for r, rc in zip(records.federated_test, test_clients) if rc == c]
                 for c in eval_clients}
  fed_counts = cache.write_manifests(out / "eval_clients", fed_records)
  fed_clients = [c for c, n in fed_counts.items() if n > 0]
  objects = [r.num_objects for recs in fed_records.values() for r in recs]
  evaluator = heldout.Evaluator(
      examples=[r.example for r in records.test], records=records.test, bundle=bundle,
      binary_components=config.binary_components,
      max_objects_per_image=config.eval_max_objects, clients=test_clients,
      corrections=config.eval_corrections)
  eval_prompt = config.eval_prompt_list[0]
  keeper = best_model.BestModelKeeper(out) if config.keep_best else None
  if keeper is not None and versions:
    keeper.restore(saved_round=max(versions), scores={
        int(r["round"]): _parse(r.get("test_dice")) for r in _read_metrics(out / "metrics.csv")
        if _parse(r.get("test_dice")) is not None})
  last_eval: dict[int, heldout.EvalResult] = {}  # The newest round's, reused at the end.

  task = tasks.build_task(
      config=config, bundle=bundle, client_ids=client_ids, manifest_dir=out / "clients",
      evaluation_clients=fed_clients, evaluation_manifest_dir=out / "eval_clients",
      evaluation_chunk=min(tasks.EVAL_CHUNK, max(objects, default=1)),
      progress_dir=out / PROGRESS_DIR, site_weights=site)
  if task.adapter is not None:
    log(adapted.describe_adapters(task.model, task.adapter.site))

  def with_embeddings(decoder):
    """`decoder`, evaluated on its adapted encoder's embeddings (`task.model`'s)."""
    if task.adapter is not None:
      evaluator.set_image_embeddings(decoder, heldout.adapted_embeddings(
          task.model, records.federated_test, pipeline_spec=task.pipeline_spec))
    return decoder
  if versions:
    _check_saved_metrics(out, max(versions))
  # Under tf, compile the rounds now: what it cannot run fails before round 0.
  tf_execution.compile_computations(
      task.training_process.next,
      *([task.evaluation_process.next] if task.evaluation_process is not None else []))

  def evaluate(state, round_num: int) -> dict:
    progress["section"] = (f"round {round_num}" if round_num
                           else "round 0 (zero-shot evaluation)")
    log(f"  round {round_num}: held-out evaluation ({evaluator.num_objects} objects, "
        f"{eval_prompt} prompts; federated evaluation on {len(fed_clients)} client(s))")
    result = evaluator(with_embeddings(task.load_state(state)), eval_prompt=eval_prompt)
    last_eval.clear()
    last_eval[round_num] = result
    if keeper is not None and keeper.consider(
        round_num, result.dice, processes.weights_from_state(task.training_process, state)):
      log(f"  round {round_num}: best held-out dice so far ({result.dice:.4f}), kept "
          "(--keep_best)")
    return {**_central_metrics(result, eval_clients), **task.federated_evaluation(state)}

  epsilon_of, privacy_setup = None, {}  # rounds -> epsilon, with differential privacy.
  if config.differential_privacy:
    errors.require(len(client_ids) >= 2, "dp_noise_multiplier",
                   f"client-level differential privacy needs at least 2 training clients, "
                   f"got {len(client_ids)}: one client's data is the whole dataset")
    privacy_setup = privacy.describe_setup(config, num_clients=len(client_ids))
    epsilon_of = privacy.epsilon_fn(
        noise_multiplier=config.dp_noise_multiplier,
        clients_per_round=min(config.clients_per_round, len(client_ids)),
        num_clients=len(client_ids), delta=privacy_setup["delta"])
    log(privacy_setup.pop("line"))
  if config.secure_aggregation:
    heaviest = max(counts[c] for c in client_ids) * config.local_epochs
    errors.require(heaviest <= aggregation.SECURE_MAX_WEIGHT, "secure_aggregation",
                   f"a client trains on {heaviest} examples per round, more than the secure "
                   f"sum's example-weight bound {aggregation.SECURE_MAX_WEIGHT:.0f}")
  round_of = {"n": 0}  # The round being trained (for its epsilon).

  def select(round_num: int) -> list[str]:
    progress["section"] = f"round {round_num}"
    round_of["n"] = round_num
    sampled = sample_clients(client_ids, round_num=round_num,
                             clients_per_round=config.clients_per_round, seed=config.seed)
    return [pipeline.round_client_id(c, round_num) for c in sampled]

  def train_metrics(result) -> dict:
    train = result.metrics["client_work"]["train"]
    row = {"train_loss": float(train["loss"]), "train_dice": float(train["dice"]),
           **aggregation.aggregation_metrics(result.metrics["aggregator"])}
    if epsilon_of is not None:
      row["dp_epsilon"] = epsilon_of(round_of["n"])
      if config.dp_clip_norm > 0:  # Fixed clipping: TFF's query reports no norm.
        row["clipping_norm"] = config.dp_clip_norm
    return row

  def on_round(round_num: int, row: dict) -> None:
    log(progress_lib.round_line(round_num, row, total=config.rounds, num_objects=evaluator.num_objects))
    record_invocation(rounds_done=round_num)

  state, _ = program_logic.train_model(
      train_process=_ReportingProcess(task.training_process, progress_dir=out / PROGRESS_DIR,
                                      images=counts, spec=task.pipeline_spec, log=log),
      initial_state=task.initial_state,
      total_rounds=config.rounds, client_selection=select, round_metrics=train_metrics,
      evaluation=evaluate, evaluation_periodicity=config.eval_every,
      program_state_manager=_state_manager(out),
      metrics_release_manager=releases.build_release_manager(
          metrics_csv=out / "metrics.csv", tensorboard_dir=out / releases.TENSORBOARD_DIR),
      columns=list(_empty_row(eval_clients)),
      on_round=on_round,
      on_resume=lambda v: log(f"resuming {out} after round {v}/{config.rounds}"))

  # Outputs.
  progress["section"] = "export"
  results = _summarize_rows(_read_metrics(out / "metrics.csv"))
  baseline, final = results["baseline"], results["final"]
  fine_tuned = task.load_state(state)
  model_round = config.rounds
  if keeper is not None:  # --keep_best: the best evaluated round (round 0 included).
    results["best"] = {"round": keeper.round, "dice": keeper.score}
    if keeper.round != config.rounds:
      decoder_lib.assign_model_weights(task.model, *keeper.weights())
      model_round = keeper.round
      log(f"--keep_best: exporting round {keeper.round} (held-out dice {keeper.score:.4f}; "
          f"the last round, {config.rounds}, scored {final['dice']:.4f})")
  fine_tuned = with_embeddings(fine_tuned)
  by_prompt = {}  # The exported model on every evaluation prompt.
  for mode in config.eval_prompt_list:
    progress["section"] = f"final evaluation ({mode} prompts)"
    r = (last_eval.get(model_round) if mode == eval_prompt else None) or evaluator(
        fine_tuned, eval_prompt=mode)
    by_prompt[mode] = r.to_dict()
    log(f"  exported model (round {model_round}), {mode} prompts: dice {r.dice:.4f}  "
        f"iou {r.iou:.4f}  mSA {r.msa:.4f}  SA50 {r.sa50:.4f}")
  results["evaluation"] = {"model_round": model_round, "by_prompt": by_prompt}
  progress["section"] = "export"
  pretrained.export_model(bundle=bundle, decoder=fine_tuned, out_dir=out / "model",
                          cache_dir=cache_root,
                          adapted=task.model if task.adapter is not None else None)
  plots.plot_metrics(out / "metrics.csv", out / "metrics.png")
  overlays = plots.write_overlays(out / "overlays", evaluator=evaluator,
                                  zero_shot_model=build.build_prompt_mask_decoder(bundle),
                                  fine_tuned_model=fine_tuned, eval_prompt=eval_prompt)
  releases.write_tensorboard_images(out / releases.TENSORBOARD_DIR, overlays,
                                    step=config.rounds)
  record_invocation(finished=True)
  summary = {
      "config": config.to_dict(),
      **results,
      "num_test_objects": evaluator.num_objects,
      "evaluation_clients": eval_clients,
      "federated_evaluation_clients": fed_clients,
      "rounds": config.rounds,
      **({"privacy": {**privacy_setup, "epsilon": epsilon_of(config.rounds)}}
         if epsilon_of is not None else {}),
      "clients": counts,
      "cache": vars(records.stats),
      "overlays": [str(p.relative_to(out)) for p in overlays],
      "invocations": invocations,
      "wall_time_s": round(sum(i["wall_time_s"] for i in invocations), 2),
  }
  fileio.write_json(out / "summary.json", summary)
  exported = by_prompt[eval_prompt]
  log(f"held-out test dice ({eval_prompt} prompts): zero-shot {baseline['dice']:.4f} -> "
      f"fine-tuned {exported['dice']:.4f}  (iou {baseline['iou']:.4f} -> {exported['iou']:.4f}, "
      f"mSA {baseline['msa']:.4f} -> {exported['msa']:.4f}, {evaluator.num_objects} objects"
      + (f"; round {model_round} kept by --keep_best" if model_round != config.rounds else "")
      + ")")
  log(f"outputs in {out}: metrics.csv, metrics.png, summary.json, model/, overlays/, "
      f"{releases.TENSORBOARD_DIR}/")
  return summary
