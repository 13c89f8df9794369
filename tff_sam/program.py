"""The federated fine-tuning program: data -> cache -> TFF rounds -> evaluation -> export.

No flags here: `run_experiment` takes one validated `RunConfig` (the binary in
`tff_sam.experiments.run` builds it from flags) and writes into `output_dir`:

* `config.json`: the config;
* `state/round_<N>/`: the server state after round N (TFF `FileProgramStateManager`,
  the last few kept); re-running the same command resumes from the newest one;
* `clients/<client>.txt`: each client's cached records (what it trains on);
* `metrics.csv`: one row per round (`round`, `train_loss`, `train_dice`,
  `test_dice`, `test_iou`, `seconds`); round 0 is the zero-shot baseline;
* `summary.json`: `config`, `baseline` and `final` (`dice`, `iou`), `rounds`,
  `wall_time_s`, data and cache counts;
* `model/`: the fine-tuned model (`TFSamModel.save_pretrained`);
* `metrics.png`: loss and held-out Dice per round;
* `overlays/`: image | ground truth | zero-shot | fine-tuned, for fixed test objects.
"""

import asyncio
import collections
import csv
import dataclasses
import io
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

# --box_jitter is in pixels of SAM's 1024 input frame; smaller models scale it.
REFERENCE_INPUT_SIZE = 1024
METRIC_FIELDS = ("round", "train_loss", "train_dice", "test_dice", "test_iou", "seconds")


def sample_clients(client_ids: list[str], *, round_num: int, clients_per_round: int,
                   seed: int) -> list[str]:
  """Clients of one round: uniform without replacement, a function of (seed, round)."""
  rng = np.random.default_rng([seed, round_num])
  k = min(clients_per_round, len(client_ids))
  return sorted(rng.choice(client_ids, size=k, replace=False).tolist())


def _write_metrics(path: Path, rows: list[dict]) -> None:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_FIELDS})
  fileio.write_text(path, buf.getvalue())


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
RESUMABLE_DIFFERENCES = ("output_dir",)


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
  for name in (STATE_DIR, "model", "overlays", "clients"):
    shutil.rmtree(out / name, ignore_errors=True)
  for name in ("metrics.csv", "metrics.png", "summary.json", "config.json"):
    (out / name).unlink(missing_ok=True)


def _parse(value: Optional[str]) -> Optional[float]:
  return float(value) if value not in (None, "") else None


def run_experiment(config: config_lib.RunConfig, *, fresh: bool = False,
                   log: Callable[[str], None] = print) -> dict:
  """Runs federated fine-tuning as configured and writes the outputs.

  If `output_dir` holds a run started with the same settings, it is resumed from its
  newest saved round: client sampling and prompts are functions of (seed, round), so
  the result equals an uninterrupted run's. Every file is written atomically; the
  metrics of a round are written before its state, and rows after the resumed round
  are dropped, so `metrics.csv` has each round exactly once.

  Args:
    config: A validated run configuration.
    fresh: Discard a previous run in `output_dir` instead of resuming it.
    log: Where progress lines go.

  Returns:
    The summary (also written to `summary.json`).

  Raises:
    errors.UserError: Bad data, model or settings (one-line message).
  """
  start = time.time()
  config.validate()
  out = Path(config.output_dir).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  if fresh:
    _start_fresh(out)
  versions = _saved_versions(out)
  if versions:
    check_resumable(out, config)
  fileio.write_text(out / "config.json", config.to_json() + "\n")
  cache_root = Path(config.cache_dir).expanduser() if config.cache_dir else fileio.default_cache_dir()

  skipped = collections.Counter()
  splits = prepare_data(config, cache_root, skipped)
  log(f"data: {len(splits.clients)} clients ({'sites' if splits.natural else config.partition}), "
      f"{splits.num_train_examples} training images, {len(splits.test)} test images")
  bundle = model_lib.load_sam(config.model, cache_dir=cache_root)
  log(f"model: {config.model} (encoder fingerprint {bundle.fingerprint})")

  stats = embeddings.CacheStats(skipped=dict(skipped))
  client_records = {}
  for client, examples in splits.clients.items():
    recs, s = embeddings.build_records(
        examples, bundle=bundle, cache_root=cache_root,
        binary_components=config.binary_components, batch_size=config.encode_batch_size,
        desc=f"encoding {client}", skip_bad_examples=config.skip_bad_examples)
    client_records[client] = recs
    stats.add(s)
  test_records, s = embeddings.build_records(
      list(splits.test), bundle=bundle, cache_root=cache_root,
      binary_components=config.binary_components, batch_size=config.encode_batch_size,
      desc="encoding test", skip_bad_examples=config.skip_bad_examples)
  stats.add(s)
  log(f"embeddings: {stats.encoded} computed, {stats.reused} reused from the cache; "
      f"{stats.objects} objects, {stats.images_without_objects} images without objects, "
      f"{stats.num_skipped} bad examples skipped")
  counts = embeddings.write_manifests(out / "clients", client_records)
  client_ids = [c for c, n in counts.items() if n > 0]
  if not client_ids:
    raise errors.DataError(out / "clients", "no client has an image with objects to train on")

  cfg = bundle.config
  spec = client_data.PipelineSpec(
      manifest_dir=str((out / "clients").resolve()),
      embedding_shape=model_lib.embedding_shape(cfg), low_res=model_lib.low_res_size(cfg),
      input_size=model_lib.image_size(cfg), prompt=config.prompt,
      prompts_per_image=config.prompts_per_image,
      box_jitter=config.box_jitter * model_lib.image_size(cfg) / REFERENCE_INPUT_SIZE,
      box_jitter_fraction=config.box_jitter_fraction,
      num_points=config.num_points, num_negative_points=config.num_negative_points,
      local_epochs=config.local_epochs, batch_size=config.batch_size, seed=config.seed)
  cdata = client_data.build_client_data(client_ids, spec)
  model_fn = federated.build_model_fn(
      sam_config=cfg, input_spec=cdata.element_type_structure, prompt=config.prompt,
      loss=config.loss, train_iou_head=config.train_iou_head)
  process = federated.compose_with_client_data(
      federated.build_training_process(
          model_fn=model_fn, client_lr=config.client_lr,
          server_optimizer=config.server_optimizer, server_lr=config.server_lr),
      cdata)
  local = model_lib.build_prompt_mask_decoder(
      bundle, prompt=config.prompt, train_iou_head=config.train_iou_head)
  initial = federated.initial_state(process, *model_lib.model_weights_lists(local))
  evaluator = evaluation.Evaluator(
      examples=[r.example for r in test_records], records=test_records, bundle=bundle,
      binary_components=config.binary_components,
      max_objects_per_image=config.eval_max_objects)

  states = _state_manager(out)
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
    state = initial
    baseline = evaluator(local)
    log(f"round 0/{config.rounds}  zero-shot test dice {baseline.dice:.4f}  iou {baseline.iou:.4f}  "
        f"({baseline.num_objects} objects)")
    rows = [{"round": 0, "test_dice": repr(baseline.dice), "test_iou": repr(baseline.iou)}]
  _write_metrics(out / "metrics.csv", rows)

  for round_num in range(start_round, config.rounds + 1):
    t0 = time.time()
    sampled = sample_clients(client_ids, round_num=round_num,
                             clients_per_round=config.clients_per_round, seed=config.seed)
    result = process.next(state, [client_data.round_client_id(c, round_num) for c in sampled])
    state = result.state
    train = result.metrics["client_work"]["train"]
    row = {"round": round_num, "train_loss": repr(float(train["loss"])),
           "train_dice": repr(float(train["dice"]))}
    evaluated = None
    if round_num % config.eval_every == 0 or round_num == config.rounds:
      model_lib.assign_model_weights(local, *federated.weights_from_state(process, state))
      evaluated = evaluator(local)
      row.update(test_dice=repr(evaluated.dice), test_iou=repr(evaluated.iou))
    seconds = time.time() - t0
    row["seconds"] = f"{seconds:.2f}"
    rows.append(row)
    _write_metrics(out / "metrics.csv", rows)
    asyncio.run(states.save(state, round_num))
    log(f"round {round_num}/{config.rounds}  loss {float(train['loss']):.4f}  "
        f"test dice {_fmt(evaluated.dice if evaluated else None)}  "
        f"iou {_fmt(evaluated.iou if evaluated else None)}  ({seconds:.1f} s)")

  evaluated_rows = [r for r in rows if _parse(r.get("test_dice")) is not None]
  baseline = evaluation.EvalResult(
      dice=_parse(rows[0]["test_dice"]), iou=_parse(rows[0]["test_iou"]),
      num_objects=evaluator.num_objects, num_images=len(evaluator.images))
  final = dataclasses.replace(baseline, dice=_parse(evaluated_rows[-1]["test_dice"]),
                              iou=_parse(evaluated_rows[-1]["test_iou"]))

  model_lib.assign_model_weights(local, *federated.weights_from_state(process, state))
  export.export_model(bundle=bundle, decoder=local, out_dir=out / "model")
  plots.plot_metrics(out / "metrics.csv", out / "metrics.png")
  zero_shot = model_lib.build_prompt_mask_decoder(bundle, prompt=config.prompt)
  overlays = plots.write_overlays(out / "overlays", evaluator=evaluator,
                                  zero_shot_model=zero_shot, fine_tuned_model=local)
  summary = {
      "config": config.to_dict(),
      "baseline": {"dice": baseline.dice, "iou": baseline.iou},
      "final": {"dice": final.dice, "iou": final.iou},
      "num_test_objects": baseline.num_objects,
      "rounds": config.rounds,
      "clients": counts,
      "cache": vars(stats),
      "overlays": [str(p.relative_to(out)) for p in overlays],
      "wall_time_s": round(time.time() - start, 2),
  }
  fileio.write_json(out / "summary.json", summary)
  log(f"held-out test dice: zero-shot {baseline.dice:.4f} -> fine-tuned {final.dice:.4f}  "
      f"(iou {baseline.iou:.4f} -> {final.iou:.4f}, {final.num_objects} objects)")
  log(f"outputs in {out}: metrics.csv, metrics.png, summary.json, model/, overlays/")
  return summary
