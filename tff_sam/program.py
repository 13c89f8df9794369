"""The federated fine-tuning program: data -> cache -> TFF rounds -> evaluation -> export.

No flags here: `run_experiment` takes one validated `RunConfig` (the binary in
`tff_sam.experiments.run` builds it from flags) and writes into `output_dir`:

* `config.json`: the config;
* `clients/<client>.txt`: each client's cached records (what it trains on);
* `metrics.csv`: one row per round (`round`, `train_loss`, `train_dice`,
  `test_dice`, `test_iou`, `seconds`); round 0 is the zero-shot baseline;
* `summary.json`: `config`, `baseline` and `final` (`dice`, `iou`), `rounds`,
  `wall_time_s`, data and cache counts;
* `model/`: the fine-tuned model (`TFSamModel.save_pretrained`);
* `metrics.png`: loss and held-out Dice per round;
* `overlays/`: image | ground truth | zero-shot | fine-tuned, for fixed test objects.
"""

import csv
import io
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


def prepare_data(config: config_lib.RunConfig, cache_root: Path) -> data.DatasetSplits:
  """Finds the data (`data_dir`, else the named dataset) and splits it."""
  root = (Path(config.data_dir).expanduser() if config.data_dir
          else data.named_dataset(config.data, cache_root=cache_root))
  splits = data.discover_splits(
      root, partition=config.partition, num_clients=config.num_clients,
      dirichlet_alpha=config.dirichlet_alpha, test_fraction=config.test_fraction,
      seed=config.seed)
  if not splits.test:
    raise errors.ConfigError(
        "test_fraction", f"no held-out test images in {root} (add a test/ folder or set "
        "--test_fraction > 0 with at least 2 images)")
  return splits


def run_experiment(config: config_lib.RunConfig, *,
                   log: Callable[[str], None] = print) -> dict:
  """Runs federated fine-tuning as configured and writes the outputs.

  Args:
    config: A validated run configuration.
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
  fileio.write_text(out / "config.json", config.to_json() + "\n")
  cache_root = Path(config.cache_dir).expanduser() if config.cache_dir else fileio.default_cache_dir()

  splits = prepare_data(config, cache_root)
  log(f"data: {len(splits.clients)} clients ({'sites' if splits.natural else config.partition}), "
      f"{splits.num_train_examples} training images, {len(splits.test)} test images")
  bundle = model_lib.load_sam(config.model, cache_dir=cache_root)
  log(f"model: {config.model} (encoder fingerprint {bundle.fingerprint})")

  stats = embeddings.CacheStats()
  client_records = {}
  for client, examples in splits.clients.items():
    recs, s = embeddings.build_records(
        examples, bundle=bundle, cache_root=cache_root,
        binary_components=config.binary_components, batch_size=config.encode_batch_size,
        desc=f"encoding {client}")
    client_records[client] = recs
    stats.add(s)
  test_records, s = embeddings.build_records(
      list(splits.test), bundle=bundle, cache_root=cache_root,
      binary_components=config.binary_components, batch_size=config.encode_batch_size,
      desc="encoding test")
  stats.add(s)
  log(f"embeddings: {stats.encoded} computed, {stats.reused} reused from the cache; "
      f"{stats.objects} objects, {stats.images_without_objects} images without objects skipped")
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
  state = federated.initial_state(process, *model_lib.model_weights_lists(local))

  evaluator = evaluation.Evaluator(
      examples=list(splits.test), records=test_records, bundle=bundle,
      binary_components=config.binary_components,
      max_objects_per_image=config.eval_max_objects)
  baseline = evaluator(local)
  log(f"round 0/{config.rounds}  zero-shot test dice {baseline.dice:.4f}  iou {baseline.iou:.4f}  "
      f"({baseline.num_objects} objects)")
  rows = [{"round": 0, "test_dice": f"{baseline.dice:.6f}", "test_iou": f"{baseline.iou:.6f}"}]
  _write_metrics(out / "metrics.csv", rows)

  final = baseline
  for round_num in range(1, config.rounds + 1):
    t0 = time.time()
    sampled = sample_clients(client_ids, round_num=round_num,
                             clients_per_round=config.clients_per_round, seed=config.seed)
    result = process.next(state, [client_data.round_client_id(c, round_num) for c in sampled])
    state = result.state
    train = result.metrics["client_work"]["train"]
    row = {"round": round_num, "train_loss": f"{float(train['loss']):.6f}",
           "train_dice": f"{float(train['dice']):.6f}"}
    evaluated = None
    if round_num % config.eval_every == 0 or round_num == config.rounds:
      model_lib.assign_model_weights(local, *federated.weights_from_state(process, state))
      evaluated = final = evaluator(local)
      row.update(test_dice=f"{final.dice:.6f}", test_iou=f"{final.iou:.6f}")
    seconds = time.time() - t0
    row["seconds"] = f"{seconds:.2f}"
    rows.append(row)
    _write_metrics(out / "metrics.csv", rows)
    log(f"round {round_num}/{config.rounds}  loss {float(train['loss']):.4f}  "
        f"test dice {_fmt(evaluated.dice if evaluated else None)}  "
        f"iou {_fmt(evaluated.iou if evaluated else None)}  ({seconds:.1f} s)")

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
