"""`--keep_best`: the best evaluated round's weights, kept across resumption; chosen on
validation images (`--validation_fraction`) in a tiny run; a `val/` folder instead."""

from pathlib import Path
import shutil

import numpy as np
import pytest

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam.data import cache
from tff_sam.data import synthetic
from tff_sam.federated.program import best_model
from tff_sam.federated.program import program
from tff_sam.federated.program import run_data
from tff_sam.federated.program import run_folder


def _weights(value: float):
  return [np.full((2, 3), value, np.float32), np.full((4,), value, np.float32)], [
      np.full((1,), -value, np.float32)]


def _files(run: Path) -> list[str]:
  return sorted(p.name for p in (run / best_model.BEST_DIR).iterdir())


def test_keeps_improvements_and_one_fallback(tmp_path):
  keeper = best_model.BestModelKeeper(tmp_path)
  assert keeper.consider(0, 0.5, _weights(0.0))
  assert not keeper.consider(1, 0.4, _weights(1.0))  # Worse: nothing written.
  assert not keeper.consider(2, float("nan"), _weights(2.0))
  assert not keeper.consider(3, None, _weights(3.0))
  assert _files(tmp_path) == ["round_0.npz"]
  assert keeper.consider(4, 0.6, _weights(4.0))
  assert keeper.consider(5, 0.7, _weights(5.0))
  assert _files(tmp_path) == ["round_4.npz", "round_5.npz"]  # The previous best stays.
  assert (keeper.round, keeper.score) == (5, 0.7)
  trainable, non_trainable = keeper.weights()
  np.testing.assert_array_equal(trainable[0], np.full((2, 3), 5.0))
  assert len(trainable) == 2 and non_trainable[0].tolist() == [-5.0]


def test_restore_drops_rounds_that_are_redone(tmp_path):
  keeper = best_model.BestModelKeeper(tmp_path)
  keeper.consider(2, 0.6, _weights(2.0))
  keeper.consider(5, 0.7, _weights(5.0))
  # The run stopped after saving round 4: round 5 is redone, its file is stale.
  again = best_model.BestModelKeeper(tmp_path)
  again.restore(saved_round=4, scores={0: 0.5, 2: 0.6, 4: 0.55})
  assert (again.round, again.score) == (2, 0.6) and _files(tmp_path) == ["round_2.npz"]
  np.testing.assert_array_equal(again.weights()[0][1], np.full((4,), 2.0))
  again.clear()
  assert _files(tmp_path) == [] and again.round is None
  with pytest.raises(errors.DataError, match="no best round was kept"):
    again.weights()


def test_unreadable_best_file_is_one_error(tmp_path):
  keeper = best_model.BestModelKeeper(tmp_path)
  keeper.consider(1, 0.6, _weights(1.0))
  (tmp_path / "best" / "round_1.npz").write_bytes(b"not a zip")
  with pytest.raises(errors.DataError, match=r"round_1\.npz: unreadable best-round weights"):
    keeper.weights()



@pytest.mark.slow
def test_keep_best_chooses_on_validation_and_the_test_set_is_scored_three_times(
    tmp_path, reference_settings):
  """Half of each site's images validate (federated evaluation every round); the test
  set is scored at round 0, the last round and on the exported model only."""
  out = tmp_path / "val"
  config = config_lib.RunConfig(output_dir=str(out), **{**reference_settings, "rounds": 3},
                                validation_fraction=0.5, keep_best=True).validate()
  lines = []
  summary = program.run_experiment(config, log=lines.append)
  rows = run_folder.read_metrics_csv(out / "metrics.csv")
  val = [run_folder.parse_metric(r["val_dice"]) for r in rows]
  tested = [int(r["round"]) for r in rows if run_folder.parse_metric(r["test_dice"]) is not None]
  assert all(v is not None for v in val) and tested == [0, 3]
  assert sum(line.startswith("  round") and "held-out evaluation" in line for line in lines) == 2
  best = int(np.argmax(val))  # Ties: the first, as the keeper keeps only improvements.
  assert summary["best"] == {"round": best, "dice": pytest.approx(val[best]),
                             "metric": "val_dice"}
  assert summary["evaluation"]["model_round"] == best
  assert summary["final"]["validation"]["dice"] == pytest.approx(val[-1])
  # The validation images are neither trained on nor tested: one per site here.
  training = {p for c in ("site_0", "site_1", "site_2")
              for p in cache.manifest_records(out / "clients" / f"{c}.txt")}
  validation = {c: cache.manifest_records(out / "eval_clients" / f"val.{c}.txt")
                for c in ("site_0", "site_1", "site_2")}
  test = {p for c in ("site_0", "site_1", "site_2")
          for p in cache.manifest_records(out / "eval_clients" / f"{c}.txt")}
  assert [len(v) for v in validation.values()] == [1, 1, 1] and len(training) == 3
  held = {p for v in validation.values() for p in v}
  assert not held & training and not held & test


def test_val_folder_and_validation_flags_meet_in_one_line(tmp_path):
  """A `val/` folder is the validation set: `--validation_fraction` with it is one
  line naming the folder; `--test_every_eval` without any validation is one line;
  `val/<name>/` of no training site is one line naming it."""
  root = synthetic.generate(tmp_path / "syn", images_per_site=2, test_per_site=1)
  other = synthetic.generate(tmp_path / "other", images_per_site=1, test_per_site=0, seed=9)
  config = lambda **kw: config_lib.RunConfig(  # pylint: disable=g-long-lambda
      data_dir=str(root), output_dir=str(tmp_path / "o"), test_fraction=0.0, **kw).validate()
  cache_root = tmp_path / "cache"
  with pytest.raises(errors.ConfigError) as e:
    run_data.prepare_data(config(test_every_eval=True), cache_root)
  assert e.value.flag == "test_every_eval" and "no validation" in str(e.value)
  shutil.copytree(other / "site_0", root / "val" / "site_9")
  with pytest.raises(errors.DataError) as d:
    run_data.prepare_data(config(), cache_root)
  assert str(root / "val" / "site_9") in str(d.value)
  (root / "val" / "site_9").rename(root / "val" / "site_0")
  splits = run_data.prepare_data(config(test_every_eval=True), cache_root)
  assert {c: [x.stem for x in v] for c, v in splits.validation.items()} == {
      "site_0": sorted(p.stem for p in (other / "site_0" / "images").iterdir())}
  with pytest.raises(errors.ConfigError) as e:
    run_data.prepare_data(config(validation_fraction=0.5), cache_root)
  assert e.value.flag == "validation_fraction" and str(root / "val") in str(e.value)
