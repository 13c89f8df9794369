"""The federated fine-tuning program: data -> cache -> TFF rounds -> evaluation -> export.

No flags here: `run_experiment` takes one validated `RunConfig` (the binary in
`tff_sam.experiments.run` builds it from flags) and writes into `output_dir`:

* `config.json`: the config;
* `state/round_<N>/`: the server state after round N (TFF `FileProgramStateManager`,
  the last few kept); re-running the same command resumes from the newest one;
* `clients/<client>.txt`: each client's cached records (what it trains on);
  `eval_clients/<client>.txt`: the held-out evaluation clients' records;
* `metrics.csv` and `tensorboard/`: one row (TensorBoard step) per round, released
  through TFF release managers (`tff_sam.releases`); round 0 is the zero-shot
  baseline. Columns (`METRIC_DOCS`): training loss/Dice, central held-out Dice/IoU
  (also per evaluation client), federated evaluation loss/Dice, robust-aggregation
  counts, seconds;
* `summary.json`: `config`, `baseline` and `final` (`dice`, `iou`, per evaluation
  client, federated evaluation), `rounds`, `aggregation` totals, `wall_time_s`, data
  and cache counts;
* `model/`: the fine-tuned model (`TFSamModel.save_pretrained`);
* `metrics.png`: loss and held-out Dice per round;
* `overlays/`: image | ground truth | zero-shot | fine-tuned, for fixed test objects
  (also as TensorBoard images).
"""

import asyncio
import collections
import csv
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from tff_sam import client_data
from tff_sam import config as config_lib
from tff_sam import data
from tff_sam import embeddings
from tff_sam import errors
from tff_sam import evaluation
from tff_sam import export
from tff_sam import federated
from tff_sam import fileio
from tff_sam import model as model_lib
from tff_sam import plots
from tff_sam import releases
from tff_sam import runtime

# Columns of metrics.csv ("<name>/<client>" columns are per evaluation client).
METRIC_DOCS = {
    "train_loss": "clients' mean training loss (example-weighted)",
    "train_dice": "clients' mean training Dice (low resolution, jittered prompts)",
    "test_dice": "central held-out Dice at the original resolution (all test objects)",
    "test_iou": "central held-out IoU",
    "test_dice/<client>": "the same over one evaluation client's images",
    "fed_eval_loss": "federated evaluation (build_fed_eval) on the held-out clients: loss",
    "fed_eval_dice": "federated evaluation: Dice at low resolution, exact prompts",
    "nonfinite_clients": "clients whose update held NaN/Inf (weight 0, ignored)",
    "zeroed_clients": "clients whose update exceeded the zeroing threshold (zeroed)",
    "clipped_clients": "clients whose update was clipped to the clipping norm",
    "zeroing_norm": "zeroing threshold (max-abs) used this round",
    "clipping_norm": "L2 clipping norm used this round",
    "seconds": "wall time of the round, evaluation included",
}


def sample_clients(client_ids: list[str], *, round_num: int, clients_per_round: int,
                   seed: int) -> list[str]:
  """Clients of one round: uniform without replacement, a function of (seed, round)."""
  rng = np.random.default_rng([seed, round_num])
  k = min(clients_per_round, len(client_ids))
  return sorted(rng.choice(client_ids, size=k, replace=False).tolist())


def _fmt(value: Optional[float], digits: int = 4) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def prepare_data(config: config_lib.RunConfig, cache_root: Path,
                 skipped: Optional[collections.Counter] = None) -> data.DatasetSplits:
  """Finds the data (`data_dir`, else the named dataset) and splits it.

  With `config.skip_bad_examples`, bad files are skipped and counted in `skipped`.
  """
  root = (Path(config.data_dir).expanduser() if config.data_dir
          else data.named_dataset(config.data, cache_root=cache_root))
  splits = data.discover_splits(
      root, partition=config.partition, num_clients=config.num_clients,
      dirichlet_alpha=config.dirichlet_alpha, test_fraction=config.test_fraction,
      seed=config.seed, skip_bad_examples=config.skip_bad_examples, skipped=skipped)
  if not splits.test:
    raise errors.ConfigError(
        "test_fraction", f"no held-out test images in {root} (add a test/ folder or set "
        "--test_fraction > 0 with at least 2 images)")
  return splits


STATE_DIR = "state"
STATE_PREFIX = "round_"
KEEP_STATES = 3
# Settings that may differ between a run and its resumption.
# How a round executes, not what it computes (equal up to float summation order).
RESUMABLE_DIFFERENCES = ("output_dir", "clients_per_subround")


def _read_metrics(path: Path) -> list[dict]:
  if not path.exists():
    return []
  with open(path) as f:
    return [dict(r) for r in csv.DictReader(f)]


def _state_manager(out: Path):
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

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


def check_resumable(out: Path, config: config_lib.RunConfig) -> None:
  """Refuses to resume a run in `out` that was started with other settings.

  Raises:
    errors.ConfigError: naming every differing flag.
  """
  saved_path = out / "config.json"
  if not saved_path.exists():
    return
  saved = json.loads(saved_path.read_text())
  current = config.to_dict()
  differing = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_DIFFERENCES and saved.get(k) != current.get(k))
  if differing:
    flags = ", ".join(f"--{k} (saved {saved.get(k)!r}, now {current.get(k)!r})" for k in differing)
    raise errors.ConfigError(
        differing[0], f"{out} holds a run with other settings: {flags}; rerun with the saved "
        "settings to resume, pass --fresh to start over, or choose another --output_dir")


def _start_fresh(out: Path) -> None:
  """Removes a previous run's state and results (never the shared cache)."""
  for name in (STATE_DIR, "model", "overlays", "clients", "eval_clients",
               releases.TENSORBOARD_DIR):
    shutil.rmtree(out / name, ignore_errors=True)
  for name in ("metrics.csv", "metrics.png", "summary.json", "config.json"):
    (out / name).unlink(missing_ok=True)


def _parse(value: Optional[str]) -> Optional[float]:
  return float(value) if value not in (None, "") else None


def _encode_all(config: config_lib.RunConfig, splits: data.DatasetSplits,
                bundle: model_lib.SamBundle, cache_root: Path, skipped: collections.Counter,
                log: Callable[[str], None]):
  """Caches every client's and every test image; returns records and stats.

  Returns:
    (client -> training records, test embedding records for central evaluation,
    test records for federated evaluation (image records in online mode, else the
    same embedding records), stats).
  """
  stats = embeddings.CacheStats(skipped=dict(skipped))
  encode = dict(bundle=bundle, cache_root=cache_root, binary_components=config.binary_components,
                batch_size=config.encode_batch_size, skip_bad_examples=config.skip_bad_examples)
  online = not config.embedding_cache
  client_records = {}
  for client, examples in splits.clients.items():
    client_records[client], s = embeddings.build_records(
        examples, desc=f"encoding {client}", online=online, **encode)
    stats.add(s)
  test_records, s = embeddings.build_records(list(splits.test), desc="encoding test", **encode)
  stats.add(s)
  fed_test_records = test_records
  if online:
    fed_test_records, _ = embeddings.build_records(list(splits.test), desc="test images",
                                                   online=True, **encode)
  log(f"{'images (online mode)' if online else 'embeddings'}: {stats.encoded} computed, "
      f"{stats.reused} reused from the cache; "
      f"{stats.objects} objects, {stats.images_without_objects} images without objects, "
      f"{stats.num_skipped} bad examples skipped")
  return client_records, test_records, fed_test_records, stats


def _pipeline_spec(config: config_lib.RunConfig, bundle: model_lib.SamBundle,
                   manifest_dir: Path, **overrides) -> client_data.PipelineSpec:
  values = dict(
      prompt=config.prompt, prompts_per_image=config.prompts_per_image,
      box_jitter=config.box_jitter, box_jitter_fraction=config.box_jitter_fraction,
      num_points=config.num_points, num_negative_points=config.num_negative_points,
      local_epochs=config.local_epochs, batch_size=config.batch_size, seed=config.seed)
  values.update(overrides)
  return client_data.build_pipeline_spec(bundle, manifest_dir,
                                         online=not config.embedding_cache, **values)


EVAL_CHUNK = 16  # prompts per federated-evaluation example (bounds its memory)


class _FederatedEvaluation:
  """`build_fed_eval` on the held-out evaluation clients, with the global model.

  Every object of every held-out image is prompted once (up to `eval_max_objects`
  per image), with its exact box (no jitter) and fixed points, in chunks of
  `EVAL_CHUNK` prompts; the prompts are the same in every round, so the numbers are
  comparable across rounds.
  """

  def __init__(self, *, config: config_lib.RunConfig, bundle: model_lib.SamBundle,
               records: dict[str, list], manifest_dir: Path):
    counts = embeddings.write_manifests(manifest_dir, records)
    self.client_ids = [c for c, n in counts.items() if n > 0]
    objects = [r.num_objects for recs in records.values() for r in recs]
    chunk = min(EVAL_CHUNK, max(objects, default=1))
    self.process = None
    if not self.client_ids:
      return
    spec = _pipeline_spec(config, bundle, manifest_dir, prompts_per_image=chunk,
                          box_jitter=0.0, box_jitter_fraction=0.0, local_epochs=1,
                          batch_size=1, evaluation=True,
                          max_objects_per_image=config.eval_max_objects)
    cdata = client_data.build_client_data(self.client_ids, spec)
    model_fn = federated.build_model_fn(
        sam_config=bundle.config, input_spec=cdata.element_type_structure,
        prompt=config.prompt, loss=config.loss, train_iou_head=config.train_iou_head,
        online_encoder=_online_encoder(config, bundle))
    self.process = federated.compose_with_client_data(
        federated.build_evaluation_process(model_fn=model_fn), cdata)
    self._state = self.process.initialize()

  def __call__(self, training_process, training_state) -> dict[str, Optional[float]]:
    if self.process is None:
      return {"fed_eval_loss": None, "fed_eval_dice": None}
    state = federated.with_model_weights(self.process, self._state, training_process,
                                         training_state)
    result = self.process.next(state, [client_data.round_client_id(c, 0)
                                       for c in self.client_ids])
    m = federated.evaluation_metrics(result)
    return {"fed_eval_loss": m["loss"], "fed_eval_dice": m["dice"]}


def _online_encoder(config: config_lib.RunConfig, bundle: model_lib.SamBundle
                    ) -> Optional[str]:
  """The encoder the TFF model holds in online mode, else None."""
  return None if config.embedding_cache else model_lib.encoder_kind(bundle)


def _central_metrics(result: evaluation.EvalResult, eval_clients: list[str]
                     ) -> dict[str, Optional[float]]:
  out = {"test_dice": result.dice, "test_iou": result.iou}
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
  progress = {"section": "setup"}
  with runtime.worker_watched(progress):
    return _run_experiment(config, fresh=fresh, log=log, progress=progress)


def _run_experiment(config: config_lib.RunConfig, *, fresh: bool,
                    log: Callable[[str], None], progress: dict[str, str]) -> dict:
  """`run_experiment`'s body; keeps `progress["section"]` up to date."""
  start = time.time()
  config.validate()
  out = Path(config.output_dir).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  versions = [] if fresh else _saved_versions(out)
  if versions:
    check_resumable(out, config)
  else:
    _start_fresh(out)
  fileio.write_text(out / "config.json", config.to_json() + "\n")
  cache_root = Path(config.cache_dir).expanduser() if config.cache_dir else fileio.default_cache_dir()

  skipped = collections.Counter()
  splits = prepare_data(config, cache_root, skipped)
  log(f"data: {len(splits.clients)} clients ({'sites' if splits.natural else config.partition}), "
      f"{splits.num_train_examples} training images, {len(splits.test)} test images in "
      f"{len(splits.test_clients)} held-out evaluation client(s)")
  bundle = model_lib.load_sam(config.model, cache_dir=cache_root)
  log(f"model: {config.model} (encoder fingerprint {bundle.fingerprint})")
  client_records, test_records, fed_test_records, stats = _encode_all(
      config, splits, bundle, cache_root, skipped, log)
  counts = embeddings.write_manifests(out / "clients", client_records)
  client_ids = [c for c, n in counts.items() if n > 0]
  if not client_ids:
    raise errors.DataError(out / "clients", "no client has an image with objects to train on")

  # Held-out records by evaluation client (skipped examples have no record).
  client_of = {id(e): c for c, exs in splits.test_clients.items() for e in exs}
  test_clients = [client_of[id(r.example)] for r in test_records]
  eval_clients = sorted(set(test_clients))
  fed_eval = _FederatedEvaluation(
      config=config, bundle=bundle, manifest_dir=out / "eval_clients",
      records={c: [r for r, rc in zip(fed_test_records, test_clients) if rc == c]
               for c in eval_clients})
  evaluator = evaluation.Evaluator(
      examples=[r.example for r in test_records], records=test_records, bundle=bundle,
      binary_components=config.binary_components,
      max_objects_per_image=config.eval_max_objects, clients=test_clients)

  cdata = client_data.build_client_data(
      client_ids, _pipeline_spec(config, bundle, out / "clients"))
  model_fn = federated.build_model_fn(
      sam_config=bundle.config, input_spec=cdata.element_type_structure, prompt=config.prompt,
      loss=config.loss, train_iou_head=config.train_iou_head,
      online_encoder=_online_encoder(config, bundle))
  aggregator = federated.build_model_aggregator(
      zeroing=config.zeroing, zeroing_quantile=config.zeroing_quantile,
      zeroing_multiplier=config.zeroing_multiplier, clipping=config.clipping,
      clipping_quantile=config.clipping_quantile,
      clipping_initial_norm=config.clipping_initial_norm)
  process = federated.compose_with_client_data(
      federated.build_training_process(
          model_fn=model_fn, client_lr=config.client_lr,
          server_optimizer=config.server_optimizer, server_lr=config.server_lr,
          model_aggregator=aggregator),
      cdata)
  # `trained` has the TFF model's weight structure; `local` is its decoder part.
  if config.embedding_cache:
    trained = local = model_lib.build_prompt_mask_decoder(
        bundle, prompt=config.prompt, train_iou_head=config.train_iou_head)
  else:
    trained = model_lib.build_online_model(
        bundle, prompt=config.prompt, train_iou_head=config.train_iou_head)
    local = trained.decoder
  initial = federated.initial_state(process, *model_lib.model_weights_lists(trained))

  states = _state_manager(out)
  metrics = releases.build_release_manager(
      metrics_csv=out / "metrics.csv", tensorboard_dir=out / releases.TENSORBOARD_DIR)
  state, start_round = None, 1
  if versions:
    state, version = asyncio.run(states.load_latest(initial))
    rows = [r for r in _read_metrics(out / "metrics.csv") if int(r["round"]) <= version]
    if state is None or not rows or rows[0]["round"] != "0":
      raise errors.DataError(out / STATE_DIR, "saved state is unreadable or metrics.csv lacks "
                             "its rounds; pass --fresh to start over")
    start_round = version + 1
    log(f"resuming {out} after round {version}/{config.rounds}")
  if state is None:
    progress["section"] = "round 0 (zero-shot evaluation)"
    state = initial
    t0 = time.time()
    row = _empty_row(eval_clients)
    baseline = evaluator(local)
    row.update(_central_metrics(baseline, eval_clients))
    row.update(fed_eval(process, state))
    row["seconds"] = round(time.time() - t0, 2)
    releases.release(metrics, row, round_num=0)
    log(f"round 0/{config.rounds}  zero-shot test dice {baseline.dice:.4f}  iou {baseline.iou:.4f}  "
        f"({baseline.num_objects} objects)  federated eval dice {_fmt(row['fed_eval_dice'])}")

  for round_num in range(start_round, config.rounds + 1):
    progress["section"] = f"round {round_num}"
    t0 = time.time()
    sampled = sample_clients(client_ids, round_num=round_num,
                             clients_per_round=config.clients_per_round, seed=config.seed)
    result = process.next(state, [client_data.round_client_id(c, round_num) for c in sampled])
    state = result.state
    train = result.metrics["client_work"]["train"]
    row = _empty_row(eval_clients)
    row.update(train_loss=float(train["loss"]), train_dice=float(train["dice"]))
    row.update(federated.aggregation_metrics(result.metrics["aggregator"]))
    evaluated = None
    if round_num % config.eval_every == 0 or round_num == config.rounds:
      model_lib.assign_model_weights(trained, *federated.weights_from_state(process, state))
      evaluated = evaluator(local)
      row.update(_central_metrics(evaluated, eval_clients))
      row.update(fed_eval(process, state))
    row["seconds"] = round(time.time() - t0, 2)
    releases.release(metrics, row, round_num=round_num)
    asyncio.run(states.save(state, round_num))
    robust = "  ".join(f"{k.split('_')[0]} {row[k]}" for k in
                       ("nonfinite_clients", "zeroed_clients", "clipped_clients")
                       if row[k])
    log(f"round {round_num}/{config.rounds}  loss {row['train_loss']:.4f}  "
        f"test dice {_fmt(evaluated.dice if evaluated else None)}  "
        f"iou {_fmt(evaluated.iou if evaluated else None)}  "
        f"fed eval dice {_fmt(row['fed_eval_dice'])}  ({row['seconds']:.1f} s)"
        + (f"  robust aggregation: {robust}" if robust else ""))

  progress["section"] = "export"
  rows = _read_metrics(out / "metrics.csv")
  results = _summarize_rows(rows)
  baseline, final = results["baseline"], results["final"]
  model_lib.assign_model_weights(trained, *federated.weights_from_state(process, state))
  export.export_model(bundle=bundle, decoder=local, out_dir=out / "model")
  plots.plot_metrics(out / "metrics.csv", out / "metrics.png")
  zero_shot = model_lib.build_prompt_mask_decoder(bundle, prompt=config.prompt)
  overlays = plots.write_overlays(out / "overlays", evaluator=evaluator,
                                  zero_shot_model=zero_shot, fine_tuned_model=local)
  releases.write_tensorboard_images(out / releases.TENSORBOARD_DIR, overlays,
                                    step=config.rounds)
  summary = {
      "config": config.to_dict(),
      **results,
      "num_test_objects": evaluator.num_objects,
      "evaluation_clients": eval_clients,
      "federated_evaluation_clients": fed_eval.client_ids,
      "rounds": config.rounds,
      "clients": counts,
      "cache": vars(stats),
      "overlays": [str(p.relative_to(out)) for p in overlays],
      "wall_time_s": round(time.time() - start, 2),
  }
  fileio.write_json(out / "summary.json", summary)
  log(f"held-out test dice: zero-shot {baseline['dice']:.4f} -> fine-tuned {final['dice']:.4f}  "
      f"(iou {baseline['iou']:.4f} -> {final['iou']:.4f}, {evaluator.num_objects} objects)")
  log(f"outputs in {out}: metrics.csv, metrics.png, summary.json, model/, overlays/, "
      f"{releases.TENSORBOARD_DIR}/")
  return summary
