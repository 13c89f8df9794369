"""A run's folder (`--output_dir`): its layout, saved states and `metrics.csv` read back.

What a command finds there decides what it does (`program.run_experiment`): resume
the run from its newest saved round (`saved_versions`, `check_resumable`), report it
complete (`completed_summary`), or start it afresh (`start_fresh`).
"""

import asyncio
import csv
import datetime
import json
import shutil
from pathlib import Path
from typing import Optional

import tensorflow_federated as tff

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam import fileio
from tff_sam.federated.program import best_model
from tff_sam.federated.program import releases

STATE_DIR = "state"
STATE_PREFIX = "round_"
KEEP_STATES = 3
INVOCATIONS_FILE = "invocations.json"
# This run's local workers (`local_worker.end_orphaned_local_workers`).
WORKERS_FILE = ".tff_workers.json"
PROGRESS_DIR = ".progress"  # The clients' reports inside a round (`progress`).
# Settings that may differ between a run and its resumption: how a round executes,
# not what it computes (equal up to float summation order), and `rounds`, which may
# grow (the run continues).
RESUMABLE_DIFFERENCES = ("output_dir", "clients_per_subround", "execution", "rounds", "workers",
                         "worker_timeout")


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
    "val_loss": "with validation images (--validation_fraction or val/): federated "
                "evaluation on the training clients' validation images: loss",
    "val_dice": "the same: Dice (what --keep_best chooses on)",
    "nonfinite_clients": "clients whose update held NaN/Inf (weight 0, ignored)",
    "zeroed_clients": "clients whose update exceeded the zeroing threshold (zeroed)",
    "clipped_clients": "clients whose update was clipped to the clipping norm",
    "zeroing_norm": "zeroing threshold (max-abs) used this round",
    "clipping_norm": "L2 clipping norm used this round",
    "dp_epsilon": "with --dp_noise_multiplier: the privacy spent so far, epsilon at "
                  "summary.json's privacy.delta (RDP accountant)",
    "seconds": "wall time of the round, evaluation included",
}
# The validation columns' prefix, and that of the validation clients' manifests in
# `eval_clients/` (`val.<client>.txt`, next to the held-out test clients').
VALIDATION_PREFIX = "val"


def selection_column(*, validation: bool) -> str:
  """The `metrics.csv` column `--keep_best` chooses on: validation Dice (when the run
  has validation images), else test Dice."""
  return f"{VALIDATION_PREFIX}_dice" if validation else "test_dice"


def metric_columns(eval_clients: list[str], *, validation: bool) -> list[str]:
  """The columns of `metrics.csv`: every one of `METRIC_DOCS` (per client if several;
  `val_*` only with validation, so that older runs keep their columns)."""
  keys = [k for k in METRIC_DOCS if not k.endswith("/<client>")
          and (validation or not k.startswith(VALIDATION_PREFIX))]
  if len(eval_clients) > 1:
    keys += [f"test_dice/{c}" for c in eval_clients]
  return keys


def read_metrics_csv(path: Path) -> list[dict]:
  """The rows of `metrics.csv` at `path` (none if it does not exist)."""
  if not path.exists():
    return []
  with open(path) as f:
    return [dict(r) for r in csv.DictReader(f)]


def state_manager(out: Path) -> tff.program.FileProgramStateManager:
  """TFF's program state manager of the run in `out` (`state/round_<N>/`)."""
  return tff.program.FileProgramStateManager(
      root_dir=str(out / STATE_DIR), prefix=STATE_PREFIX, keep_total=KEEP_STATES,
      keep_first=False)


def saved_versions(out: Path) -> list[int]:
  """Complete saved rounds; removes temporary folders a crash left mid-save."""
  for leftover in (out / STATE_DIR).glob(f"{STATE_PREFIX}*_temp*"):
    shutil.rmtree(leftover, ignore_errors=True)
  for leftover in out.glob("metrics.csv_temp*"):  # CSVFileReleaseManager's temporary file
    leftover.unlink(missing_ok=True)
  versions = asyncio.run(state_manager(out).get_versions())
  return list(versions or [])


def check_resumable(out: Path, config: config_lib.RunConfig, versions: list[int]) -> None:
  """Refuses to resume a run in `out` that was started with other settings.

  A setting the saved `config.json` lacks (it predates the setting) counts as its
  default.

  Args:
    out: The run's folder.
    config: The settings of this invocation.
    versions: The saved rounds in `out` (`saved_versions`).

  Raises:
    errors.ConfigError: naming every differing flag.
  """
  saved_path = out / "config.json"
  if not saved_path.exists():
    return
  saved = config_lib.RunConfig.saved_settings(json.loads(saved_path.read_text()))
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


def start_fresh(out: Path) -> None:
  """Removes a previous run's state and results (never the shared cache)."""
  for name in (STATE_DIR, "model", "overlays", "clients", "eval_clients",
               releases.TENSORBOARD_DIR, best_model.BEST_DIR):
    shutil.rmtree(out / name, ignore_errors=True)
  for name in ("metrics.csv", "metrics.png", "summary.json", "config.json", INVOCATIONS_FILE):
    (out / name).unlink(missing_ok=True)


def completed_summary(out: Path, config: config_lib.RunConfig,
                      versions: list[int]) -> Optional[dict]:
  """The summary of a finished run in `out` with `config`'s settings, else None.

  `versions` are the saved rounds in `out` (`saved_versions`).

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
  if config.rounds == 0:  # Nothing is saved for round 0: the summary must match (a
    # setting newer than the summary counts as its default, as in `check_resumable`).
    saved = config_lib.RunConfig.saved_settings(summary.get("config", {}))
    return summary if saved == config.to_dict() else None
  if not versions or max(versions) != config.rounds:
    return None
  return summary


def read_invocations(out: Path) -> list[dict]:
  """The commands that worked on the run in `out` (`invocations.json`; none if unreadable)."""
  try:
    entries = json.loads((out / INVOCATIONS_FILE).read_text())
  except (OSError, ValueError):
    return []
  return entries if isinstance(entries, list) else []


def begin_invocation(out: Path, versions: list[int]) -> list[dict]:
  """`invocations.json`'s entries with a new one for this command, which starts fresh
  (no `versions`) or resumes after the newest of `versions`.

  An earlier command that ended without its bookkeeping (`kill -9` between a round's
  saved state and its entry) gets the rounds its saved states show.
  """
  entries = read_invocations(out) if versions else []
  if entries and not entries[-1].get("finished"):
    entries[-1]["rounds_done"] = max(versions)
  entries.append({
      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "resumed_after_round": max(versions) if versions else None,
      "rounds_done": max(versions) if versions else 0, "wall_time_s": 0.0, "finished": False})
  return entries


def parse_metric(value: Optional[str]) -> Optional[float]:
  """A `metrics.csv` cell as a number (None if empty)."""
  return float(value) if value not in (None, "") else None


def summarize_metrics(rows: list[dict]) -> dict:
  """`baseline`, `final` and aggregation totals from the rows of `metrics.csv`."""
  evaluated = [r for r in rows if parse_metric(r.get("test_dice")) is not None]

  def scores(row):
    out = {"dice": parse_metric(row["test_dice"]), "iou": parse_metric(row["test_iou"]),
           "msa": parse_metric(row.get("test_msa")), "sa50": parse_metric(row.get("test_sa50")),
           "federated_eval": {"loss": parse_metric(row.get("fed_eval_loss")),
                              "dice": parse_metric(row.get("fed_eval_dice"))}}
    if "val_dice" in row:  # With --validation_fraction.
      out["validation"] = {"loss": parse_metric(row.get("val_loss")),
                           "dice": parse_metric(row["val_dice"])}
    per_client = {k.split("/", 1)[1]: parse_metric(v) for k, v in row.items()
                  if k.startswith("test_dice/")}
    if per_client:
      out["dice_by_client"] = per_client
    return out

  totals = {k: int(sum(parse_metric(r.get(k)) or 0 for r in rows))
            for k in ("nonfinite_clients", "zeroed_clients", "clipped_clients")}
  return {"baseline": scores(rows[0]), "final": scores(evaluated[-1]), "aggregation": totals}


def rewrite_saved_metrics(out: Path, version: int) -> list[int]:
  """Rewrites `metrics.csv` to hold exactly rounds 0..`version`, the saved state's.

  A resumed run continues from its saved state, so the file must agree with it: a row
  released twice for one round (the later one kept), or rows of rounds past the saved
  state, are dropped. A missing round cannot be recomputed, so it is refused.

  Returns:
    The rounds whose duplicate rows were dropped.

  Raises:
    errors.DataError: `metrics.csv` lacks a round of the saved state.
  """
  path = out / "metrics.csv"
  if path.exists():
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      fields, rows = reader.fieldnames or [], list(reader)
  else:
    fields, rows = [], []
  by_round: dict[int, dict] = {}
  duplicated = []
  for row in rows:
    r = int(row[releases.ROUND_KEY])
    if r <= version:
      if r in by_round:
        duplicated.append(r)
      by_round[r] = row
  missing = sorted(set(range(version + 1)) - set(by_round))
  if missing:
    raise errors.DataError(path, f"lacks round(s) {', '.join(map(str, missing))} of the saved "
                           f"state (round {version}); pass --fresh to start over")
  if len(by_round) != len(rows):  # A duplicate, or rows past the saved state.
    with fileio.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=fields)
      writer.writeheader()
      writer.writerows(by_round[r] for r in range(version + 1))
  return sorted(set(duplicated))
