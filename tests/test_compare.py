"""`compare`: the arms of a comparison, their summary and table, and one tiny end to end."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam.data import discovery
from tff_sam.evaluation import plots
from tff_sam.federated.program import compare
from tff_sam.federated.program import run_folder

from conftest import REPO
from conftest import run_cli


def _splits(counts: dict[str, int]) -> discovery.DatasetSplits:
  example = lambda c, i: discovery.Example(stem=f"{c}_{i}", image_path=Path(f"{c}_{i}.png"),  # pylint: disable=g-long-lambda
                                           mask_path=Path(f"{c}_{i}.tif"))
  return discovery.DatasetSplits(
      clients={c: tuple(example(c, i) for i in range(n)) for c, n in counts.items()},
      test_clients={"held": (example("test", 0),)}, natural=True)


def _base(tmp_path, **overrides):
  values = dict(output_dir=str(tmp_path / "out"), rounds=5, clients_per_round=2,
                local_epochs=2, batch_size=2, seed=7)
  values.update(overrides)
  return config_lib.RunConfig(**values).validate()


def test_arms_take_the_federated_runs_local_steps(tmp_path):
  counts = {"a": 5, "b": 3, "c": 8}
  base = _base(tmp_path)
  arms = compare.plan_arms(base, splits=_splits(counts), seeds=2, root=tmp_path / "cmp",
                           leave_one_site_out=True)
  names = [a.name for a in arms if a.seed == 7]
  assert names == ["zero_shot", "local/a", "local/b", "local/c", "centralized", "federated",
                   "fed_lora", "without/a", "without/b", "without/c"]
  assert [a.seed for a in arms] == [7] * 10 + [8] * 10
  for seed in (7, 8):
    by_name = {a.name: a for a in arms if a.seed == seed}
    fed = by_name["federated"]
    assert fed.config == config_lib.RunConfig.from_dict(
        {**base.to_dict(), "seed": seed, "output_dir": fed.config.output_dir})
    lora = by_name["fed_lora"]  # The federated run with adapters, nothing else changed.
    assert lora.config == dataclasses.replace(fed.config, adapter="lora",
                                              output_dir=lora.config.output_dir)
    assert lora.steps == fed.steps
    # Every site is sampled in some rounds (2 of 3 per round); alone it trains as long.
    for site, n in counts.items():
      local = by_name[f"local/{site}"]
      assert local.config.train_clients == (site,) and local.config.clients_per_round == 1
      assert local.steps == {site: fed.steps[site]} and fed.steps[site] > 0
      assert fed.steps[site] % (2 * -(-n // 2)) == 0  # Whole rounds of 2 epochs.
    assert sum(fed.steps.values()) < 5 * sum(2 * -(-n // 2) for n in counts.values())
    central = by_name["centralized"]
    assert central.config.pool_clients and central.config.clients_per_round == 1
    per_round = 2 * -(-sum(counts.values()) // 2)
    assert abs(sum(central.steps.values()) - sum(fed.steps.values())) <= per_round / 2
    assert by_name["zero_shot"].config.rounds == 0 and by_name["zero_shot"].steps == {
        "a": 0, "b": 0, "c": 0}
    without = by_name["without/b"].config
    assert without.train_clients == ("a", "c") and without.clients_per_round == 2
    folders = {a.config.output_dir for a in by_name.values()}
    assert len(folders) == 10 and all(f"seed{seed}" in f for f in folders)


def test_arms_can_be_chosen_and_fed_lora_needs_no_adapter_in_the_settings(tmp_path):
  splits = _splits({"a": 2, "b": 2})
  arms = compare.plan_arms(_base(tmp_path), splits=splits, seeds=1, root=tmp_path / "c",
                           arms=("zero_shot", "federated", "fed_lora"))
  assert [a.name for a in arms] == ["zero_shot", "federated", "fed_lora"]
  with_lora = compare.plan_arms(_base(tmp_path, adapter="lora"), splits=splits, seeds=1,
                                root=tmp_path / "c")
  assert "fed_lora" not in [a.name for a in with_lora]
  assert all(a.config.adapter == "lora" for a in with_lora)
  tuned = compare.plan_arms(_base(tmp_path), splits=splits, seeds=1, root=tmp_path / "c",
                            arms=("federated", "fed_lora"), lora={"lora_alpha": 64.0})
  assert [(a.config.adapter, a.config.lora_alpha) for a in tuned] == [("none", 4.0),
                                                                      ("lora", 64.0)]
  with pytest.raises(errors.ConfigError, match="^--lora_rank: must be >= 1"):
    compare.plan_arms(_base(tmp_path), splits=splits, seeds=1, root=tmp_path / "c",
                      lora={"lora_rank": 0})
  with pytest.raises(ValueError, match="unknown arms"):
    compare.plan_arms(_base(tmp_path), splits=splits, seeds=1, root=tmp_path / "c",
                      arms=("federated", "fedprox"))


def test_arms_without_a_server_drop_privacy_and_compression(tmp_path):
  base = _base(tmp_path, dp_noise_multiplier=1.0, dp_clip_norm=0.1, algorithm="fedprox",
               proximal_strength=0.1, zeroing=False)
  arms = {a.name: a.config for a in compare.plan_arms(
      base, splits=_splits({"a": 2, "b": 2}), seeds=1, root=tmp_path / "c")}
  for name in ("zero_shot", "local/a", "local/b", "centralized"):
    assert not arms[name].differential_privacy and arms[name].dp_clip_norm == 0, name
    assert arms[name].algorithm == "fedprox"  # The local algorithm stays.
  for name in ("federated", "fed_lora"):
    assert arms[name].dp_noise_multiplier == 1.0 and arms[name].dp_clip_norm == 0.1
  secure = compare.plan_arms(_base(tmp_path, secure_aggregation=True),
                             splits=_splits({"a": 2, "b": 2}), seeds=1, root=tmp_path / "c",
                             arms=("local", "federated"))
  assert [a.config.secure_aggregation for a in secure] == [False, False, True]


def _summary(dice: float, by_client: dict[str, float]) -> dict:
  result = lambda d: {"dice": d, "iou": d / 2, "msa": d / 4, "sa50": d / 3}  # pylint: disable=g-long-lambda
  entry = {**result(dice), "by_client": {c: result(v) for c, v in by_client.items()}}
  return {"evaluation": {"model_round": 1, "by_prompt": {"box": entry}}, "wall_time_s": 1.0}


def test_summary_rows_gains_table_and_plot(tmp_path):
  base = _base(tmp_path, eval_prompt=("box",))
  arms = compare.plan_arms(base, splits=_splits({"a": 2, "b": 2}), seeds=2,
                           root=tmp_path / "cmp")
  dice = {("zero_shot", 7): 0.5, ("zero_shot", 8): 0.5, ("local/a", 7): 0.6,
          ("local/a", 8): 0.62, ("local/b", 7): 0.4, ("local/b", 8): 0.5,
          ("centralized", 7): 0.8, ("centralized", 8): 0.78, ("federated", 7): 0.7,
          ("federated", 8): 0.76, ("fed_lora", 7): 0.75, ("fed_lora", 8): 0.79}
  summaries = [_summary(dice[(a.name, a.seed)], {"x": dice[(a.name, a.seed)] - 0.1,
                                                  "y": dice[(a.name, a.seed)] + 0.1})
               for a in arms]
  table = compare.summarize(arms, summaries, eval_prompt=("box",))["box"]
  rows = table["rows"]
  assert list(rows) == ["zero_shot", "local_only", "local/a", "local/b", "centralized",
                        "federated", "fed_lora"]
  assert rows["federated"]["dice"]["all"]["mean"] == pytest.approx(0.73)
  assert rows["federated"]["dice"]["all"]["std"] == pytest.approx(np.std([0.7, 0.76], ddof=1))
  assert rows["local_only"]["dice"]["all"]["mean"] == pytest.approx(np.mean([0.5, 0.56]))
  assert rows["federated"]["msa"]["y"]["mean"] == pytest.approx(0.83 / 4)
  gain = table["gains"]["federated-local_only"]["dice"]["all"]
  assert gain["mean"] == pytest.approx(np.mean([0.7 - 0.5, 0.76 - 0.56]))
  assert gain["std"] == pytest.approx(np.std([0.2, 0.2], ddof=1), abs=1e-12)
  assert table["gains"]["federated-centralized"]["dice"]["all"]["mean"] == pytest.approx(-0.06)
  assert table["gains"]["federated-zero_shot"]["dice"]["x"]["mean"] == pytest.approx(0.23)
  assert table["gains"]["fed_lora-federated"]["dice"]["all"]["mean"] == pytest.approx(0.04)
  assert table["gains"]["fed_lora-zero_shot"]["dice"]["all"]["mean"] == pytest.approx(0.27)

  result = compare.write_outputs(tmp_path / "cmp", base=base, arms=arms, summaries=summaries,
                                 seeds=2, leave_one_site_out=False)
  saved = json.loads((tmp_path / "cmp" / compare.COMPARE_FILE).read_text())
  assert saved == json.loads(json.dumps(result)) and len(saved["arms"]) == len(arms)
  md = (tmp_path / "cmp" / compare.TABLE_FILE).read_text()
  assert "| federated | 73.0 ± 4.2 |" in md and "| Dice x | Dice y |" in md
  assert compare.markdown_of(saved) == md  # The tables follow from the JSON alone.
  assert "| gain federated-zero_shot | 23.0 ± 4.2 |" in md
  assert "| fed_lora | 77.0 ± 2.8 |" in md and "| gain fed_lora-federated | 4.0 ± 1.4 |" in md
  image = cv2.imread(str(tmp_path / "cmp" / compare.PLOT_FILE))
  assert image is not None and image.shape[0] > 200 and image.std() > 5


def _personalized_comparison(tmp_path):
  """A comparison of sites a and b (held-out clients x and y) over 2 seeds, whose
  federated arm personalized: (base, arms, summaries)."""
  base = _base(tmp_path, eval_prompt=("box",), personalize_steps=3)
  arms = compare.plan_arms(base, splits=_splits({"a": 2, "b": 2}), seeds=2,
                           root=tmp_path / "cmp", arms=("zero_shot", "local", "federated"))
  on = {"zero_shot": (0.5, 0.5), "local/a": (0.7, 0.3), "local/b": (0.2, 0.6),
        "federated": (0.6, 0.62)}
  summaries = []
  for a in arms:
    x, y = on[a.name]
    summary = _summary((x + y) / 2 + 0.01 * (a.seed - 7), {"x": x, "y": y + 0.01 * (a.seed - 7)})
    summary["config"] = a.config.to_dict()
    if a.name == "federated":
      summary["personalized"] = {"steps": 3, "sites": {
          site: {"test_client": c, "by_prompt": {"box": {"personalized": {
              "dice": d, "iou": d / 2, "msa": d / 4, "sa50": d / 3}}}}
          for site, c, d in (("a", "x", 0.75), ("b", "y", 0.65 + 0.01 * (a.seed - 7)))}}
    summaries.append(summary)
  return base, arms, summaries


def test_automatic_segmentation_rows_show_msa_where_there_is_no_dice(tmp_path):
  """`--eval_prompt=...,automatic`: its Dice is NaN (no prompts), so its table has "-"
  there, its per-client columns and its plot panel show mSA."""
  base = _base(tmp_path, eval_prompt=("box", "automatic"))
  arms = compare.plan_arms(base, splits=_splits({"a": 2, "b": 2}), seeds=1,
                           root=tmp_path / "cmp", arms=("zero_shot", "federated"))
  summaries = []
  for a in arms:
    summary = _summary(0.5 if a.name == "zero_shot" else 0.7, {"x": 0.6})
    auto = {"dice": float("nan"), "iou": float("nan"), "msa": 0.2 if a.name == "zero_shot"
            else 0.3, "sa50": 0.4, "objects_found": 9}
    summary["evaluation"]["by_prompt"]["automatic"] = {**auto, "by_client": {"x": auto}}
    summaries.append(summary)
  (tmp_path / "cmp").mkdir()
  result = compare.write_outputs(tmp_path / "cmp", base=base, arms=arms, summaries=summaries,
                                 seeds=1, leave_one_site_out=False)
  rows = result["table"]["automatic"]["rows"]
  assert rows["federated"]["dice"]["all"]["mean"] is None
  assert rows["federated"]["msa"]["x"]["mean"] == pytest.approx(0.3)
  md = (tmp_path / "cmp" / compare.TABLE_FILE).read_text()
  assert "**automatic segmentation** (held-out" in md and "| mSA x | local steps |" in md
  assert "| federated | - | - | 30.0 | 40.0 | 30.0 |" in md
  assert "| gain federated-zero_shot | - | - | 10.0 | 0.0 | 10.0 |" in md
  titles = [t for t, _, _ in plots._comparison_panels(result["table"], "dice")]  # pylint: disable=protected-access
  assert titles[1] == "held-out msa (automatic segmentation; every held-out client)"


def test_own_site_view_scores_each_site_where_it_works_with_its_personalized_model(tmp_path):
  """Sites a and b use held-out clients x and y. Local-only: each site's own model on its
  own client; personalized: the federated run's per-site copies; the rest: one model
  on each site's client; "all" is the mean over sites. Only the federated arm
  personalizes."""
  base, arms, summaries = _personalized_comparison(tmp_path)
  assert {a.name: a.config.personalize_steps for a in arms if a.seed == 7} == {
      "zero_shot": 0, "local/a": 0, "local/b": 0, "federated": 3}
  table = compare.summarize(arms, summaries, eval_prompt=("box",),
                            site_clients={"a": "x", "b": "y"})["box"]
  assert "personalized" not in table["rows"]  # The all-clients view is unchanged.
  own = table["own_site"]
  assert own["sites"] == {"a": "x", "b": "y"}
  assert list(own["rows"]) == ["zero_shot", "local_only", "federated", "personalized"]
  local = own["rows"]["local_only"]["dice"]
  assert local["a"]["mean"] == pytest.approx(0.7) and local["b"]["mean"] == pytest.approx(0.605)
  assert local["all"]["mean"] == pytest.approx(np.mean([(0.7 + 0.6) / 2, (0.7 + 0.61) / 2]))
  assert own["rows"]["federated"]["dice"]["a"]["mean"] == pytest.approx(0.6)
  assert own["rows"]["personalized"]["dice"]["all"]["mean"] == pytest.approx(0.7025)
  gain = own["gains"]["personalized-local_only"]["dice"]["all"]
  assert gain["mean"] == pytest.approx(0.7025 - 0.6525)
  assert own["gains"]["personalized-federated"]["dice"]["b"]["mean"] == pytest.approx(0.03)
  compare.write_outputs(tmp_path / "cmp", base=base, arms=arms, summaries=summaries, seeds=2,
                        leave_one_site_out=False, site_clients={"a": "x", "b": "y"})
  md = (tmp_path / "cmp" / compare.TABLE_FILE).read_text()
  assert "**box prompts, each site on its own held-out client**" in md
  assert "| Dice a (on x) | Dice b (on y) |" in md
  assert "| personalized | 70.2 ± 0.4 |" in md and "| gain personalized-local_only | 5.0" in md
  # The plot has a panel for each view: every held-out client, each site on its own.
  height = cv2.imread(str(tmp_path / "cmp" / compare.PLOT_FILE)).shape[0]
  assert height == 2 * 380, height  # 3.8 inches at 100 dpi per panel.


def test_demo_check_puts_a_run_next_to_its_arm_and_seed_of_the_comparison(tmp_path):
  """tools/demo_check.py (what `make demo` ends with): the run's Dice next to the same
  seed of the comparison's federated arm and its mean over seeds, the personalized
  sites' mean too; a different number or setting is said, not hidden."""
  base, arms, summaries = _personalized_comparison(tmp_path)
  (tmp_path / "cmp").mkdir()
  compare.write_outputs(tmp_path / "cmp", base=base, arms=arms, summaries=summaries, seeds=2,
                        leave_one_site_out=False, site_clients={"a": "x", "b": "y"})
  run = tmp_path / "run"
  run.mkdir()
  federated = next(s for a, s in zip(arms, summaries) if (a.name, a.seed) == ("federated", 7))
  tool = [sys.executable, str(REPO / "tools" / "demo_check.py"), str(run),
          str(tmp_path / "cmp" / compare.COMPARE_FILE)]

  def check(summary):
    (run / "summary.json").write_text(json.dumps(summary))
    done = subprocess.run(tool, capture_output=True, text=True, check=True, timeout=60)
    return done.stdout.splitlines()

  lines = check(federated)
  assert lines[1] == ("  federated, box prompts, every held-out client: this run 61.00, "
                      "comparison 61.00 (the same); 2 seed(s): 61.5 ± 0.7")
  assert lines[2] == ("  personalized, box prompts, each site on its own client (mean over 2 "
                      "sites): this run 70.00, comparison 70.00 (the same); 2 seed(s): 70.2 ± 0.4")
  older = json.loads((tmp_path / "cmp" / compare.COMPARE_FILE).read_text())
  del older["config"]["pred_iou_thresh"]  # A comparison made before the setting existed.
  (tmp_path / "cmp" / compare.COMPARE_FILE).write_text(json.dumps(older))
  assert check(federated)[1] == lines[1]  # Its default: no difference.
  changed = json.loads(json.dumps(federated))
  changed["evaluation"]["by_prompt"]["box"]["dice"] = 0.63
  changed["config"]["rounds"] += 1
  lines = check(changed)
  assert lines[1] == "  note: this run's settings differ from the comparison's: rounds"
  assert "comparison 61.00 (DIFFERS by +2.00)" in lines[2]


def test_label_levels_plan_arms_per_count_and_the_curve_reads_each_level(
    tmp_path, reference_data, reference_cache):
  """`--labels_per_site=1,all`: every arm at each count (zero-shot once, with all
  images, in the main folder), and the curve row by row from each level's own table."""
  base = _base(tmp_path, data_dir=str(reference_data), cache_dir=str(reference_cache),
               eval_prompt=("box",), rounds=2, batch_size=1)
  levels = compare._plan_levels(base, root=tmp_path / "cmp", seeds=1, labels=(1, 0),
                                cache_root=Path(reference_cache), arms=compare.ARM_KINDS,
                                leave_one_site_out=False, lora=None)
  assert list(levels) == [0, 1]
  names = {n: [a.name for a in arms] for n, arms in levels.items()}
  assert names[0][0] == "zero_shot" and names[1] == names[0][1:]
  assert {a.config.labels_per_site for a in levels[1]} == {1}
  assert all(Path(a.config.output_dir).parent.parent == tmp_path / "cmp" / "labels1"
             for a in levels[1])
  # One image per site instead of two: half the local steps, the same sampling.
  assert levels[1][-2].name == levels[0][-2].name == "federated"
  assert {c: 2 * n for c, n in levels[1][-2].steps.items()} == levels[0][-2].steps

  def summaries(arms, dice):
    return [_summary(dice[a.name], {c: dice[a.name] for c in ("site_0", "site_1", "site_2")})
            for a in arms]

  zero = levels[0][:1]
  dice_all = {a.name: 0.5 + 0.05 * i for i, a in enumerate(levels[0])}
  dice_one = {a.name: 0.4 + 0.05 * i for i, a in enumerate(levels[1])}
  curve = compare.label_curve({
      0: (levels[0], summaries(levels[0], dice_all)),
      1: ([*zero, *levels[1]], summaries(zero, dice_all) + summaries(levels[1], dice_one))},
      prompts=("box",), site_clients=None)["box"]
  assert list(curve) == ["zero_shot", "local_only", "centralized", "federated"]
  assert curve["zero_shot"]["1"]["mean"] == curve["zero_shot"]["all"]["mean"] == 0.5
  assert curve["federated"]["1"]["mean"] == pytest.approx(dice_one["federated"])
  assert curve["federated"]["all"]["mean"] == pytest.approx(dice_all["federated"])
  image = plots.plot_label_curve({"box": curve}, tmp_path / "labels.png")
  assert cv2.imread(str(image)).std() > 5
  # write_outputs writes the tables of all images and the curve in one go.
  (tmp_path / "out").mkdir()
  result = compare.write_outputs(
      tmp_path / "out", base=base, arms=levels[0], summaries=summaries(levels[0], dice_all),
      seeds=1, leave_one_site_out=False, label_levels={
          0: (levels[0], summaries(levels[0], dice_all)),
          1: ([*zero, *levels[1]], summaries(zero, dice_all) + summaries(levels[1], dice_one))})
  assert result["label_curve"]["box"] == curve and result["label_curve_view"] == "all"
  assert list(result["label_arms"]) == ["all", "1"]  # Every count's runs, not only the curve.
  fed_one = next(a for a in result["label_arms"]["1"] if a["name"] == "federated")
  assert fed_one["results"]["box"]["dice"] == pytest.approx(dice_one["federated"])
  assert json.loads((tmp_path / "out" / compare.COMPARE_FILE).read_text()) == json.loads(
      json.dumps(result))
  md = (tmp_path / "out" / compare.TABLE_FILE).read_text()
  assert md.index("**box prompts** (held-out") < md.index("| arm | 1 | all |")
  assert compare.markdown_of(json.loads((tmp_path / "out" / compare.COMPARE_FILE).read_text())) == md
  assert f"| federated | {100 * dice_one['federated']:.1f} | {100 * dice_all['federated']:.1f} |" in md
  assert cv2.imread(str(tmp_path / "out" / compare.LABELS_PLOT_FILE)).std() > 5


def test_the_flags_arm_names_are_the_planners():
  assert compare.ARM_KINDS == (compare.ZERO_SHOT, compare.LOCAL, compare.CENTRALIZED,
                               compare.FEDERATED, compare.FED_LORA)


def test_selecting_and_pooling_clients_keeps_the_test_set():
  splits = _splits({"a": 2, "b": 3, "c": 1})
  only = discovery.select_clients(splits, train_clients=("c", "a"))
  assert list(only.clients) == ["c", "a"] and only.test_clients == splits.test_clients
  pooled = discovery.select_clients(splits, train_clients=("a", "b"), pool=True)
  assert list(pooled.clients) == [discovery.POOLED_CLIENT]
  assert [e.stem for e in pooled.clients["pooled"]] == ["a_0", "a_1", "b_0", "b_1", "b_2"]
  with pytest.raises(errors.ConfigError, match=r"--train_clients: names z, not a training "
                     r"client of the data \(its clients: a, b, c\)"):
    discovery.select_clients(splits, train_clients=("z",))


@pytest.mark.parametrize("overrides, flag", [
    (dict(eval_prompt=("box", "boxes")), "eval_prompt"),
    (dict(eval_prompt=("box", "box")), "eval_prompt"),
    (dict(eval_corrections=0), "eval_corrections"),
    (dict(sub_iterations=1), "sub_iterations"),
    (dict(train_clients=("a", "a")), "train_clients"),
    (dict(pool_clients=True, clients_per_round=2), "clients_per_round"),
])
def test_bad_comparison_settings_name_the_flag(tmp_path, overrides, flag):
  with pytest.raises(errors.ConfigError, match=f"^--{flag}: "):
    _base(tmp_path, **overrides)


def test_config_round_trips_the_new_tuples(tmp_path):
  config = _base(tmp_path, eval_prompt=("point", "box_corrections"), train_clients=("a",))
  again = config_lib.RunConfig.from_dict(json.loads(config.to_json()))
  assert again == config and again.eval_prompt_list == ("point", "box_corrections")
  assert _base(tmp_path, prompt="points").eval_prompt_list == ("point",)
  assert _base(tmp_path, prompt="iterative").eval_prompt_list == ("box",)


@pytest.mark.slow
def test_compare_end_to_end_on_two_tiny_sites(tmp_path, reference_data, reference_cache,
                                              run_binary):
  data = tmp_path / "data"
  shutil.copytree(reference_data, data)
  shutil.rmtree(data / "site_2")
  shutil.rmtree(data / "test" / "site_2")
  out = tmp_path / "out"
  args = [f"--data_dir={data}", f"--cache_dir={reference_cache}", "--model=tiny",
          "--rounds=1", "--clients_per_round=2", "--local_epochs=1", "--batch_size=2",
          "--prompts_per_image=2", "--client_lr=3e-3", "--seed=5", f"--output_dir={out}",
          "--eval_prompt=box,box_corrections", "--eval_corrections=2", "--seeds=1",
          # Each arm also trains with iterative prompting in TFF and keeps its best round.
          "--prompt=iterative", "--sub_iterations=2", "--keep_best", "--eval_every=1",
          # The fed_lora arm's adapters (the federated arm has none).
          "--lora_alpha=8",
          # The federated arm's sites personalize (each site_k is scored on test/site_k).
          "--personalize_steps=2"]
  # A fresh process, so its peak memory is the arms' own.
  result = run_cli([sys.executable, "-m", "tff_sam.experiments.compare", *args], timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  root = out / "compare"
  saved = json.loads((root / compare.COMPARE_FILE).read_text())
  names = [a["name"] for a in saved["arms"]]
  assert names == ["zero_shot", "local/site_0", "local/site_1", "centralized", "federated",
                   "fed_lora"]
  # All arms in one process without growth: the peak after the last arm is at most 1.2x
  # the peak after the first that trained (the zero-shot arm compiles no round).
  peaks = [m["peak_rss_bytes"] for m in saved["memory"]]
  assert [m["arm"] for m in saved["memory"]] == names
  assert peaks[-1] <= 1.2 * peaks[1], [round(p / 2**30, 2) for p in peaks]
  summaries = {a["name"]: json.loads((Path(a["output_dir"]) / "summary.json").read_text())
               for a in saved["arms"]}
  # Each arm is its own run: its clients, its rounds, its exported model.
  assert summaries["zero_shot"]["rounds"] == 0
  assert summaries["local/site_0"]["clients"] == {"site_0": 2}
  assert summaries["centralized"]["clients"] == {"pooled": 4}
  assert summaries["federated"]["clients"] == {"site_0": 2, "site_1": 2}
  assert summaries["fed_lora"]["config"]["adapter"] == "lora"
  assert summaries["fed_lora"]["config"]["lora_alpha"] == 8.0
  assert summaries["federated"]["config"]["lora_alpha"] == 4.0
  assert summaries["federated"]["config"]["adapter"] == "none"
  for a in saved["arms"]:
    assert (Path(a["output_dir"]) / "model" / "config.json").is_file()
  # --keep_best: each arm exported its best evaluated round, and says which.
  for a in saved["arms"]:
    rows = run_folder.read_metrics_csv(Path(a["output_dir"]) / "metrics.csv")
    dice = [float(r["test_dice"]) for r in rows]
    best = int(np.argmax(dice))
    assert a["model_round"] == best == summaries[a["name"]]["best"]["round"]
    assert a["results"]["box"]["dice"] == pytest.approx(dice[best], abs=1e-9)
    if len(rows) > 1:  # Iterative training ran in TFF: losses and federated evaluation.
      assert np.isfinite(float(rows[1]["train_loss"])) and 0 <= float(rows[1]["fed_eval_dice"]) <= 1
  # The zero-shot arm and the federated run's round 0 were computed apart and agree.
  fed_rows = run_folder.read_metrics_csv(Path(saved["arms"][4]["output_dir"]) / "metrics.csv")
  zero = saved["arms"][0]["results"]["box"]
  assert zero["dice"] == pytest.approx(float(fed_rows[0]["test_dice"]), abs=1e-9)
  assert zero["msa"] == pytest.approx(float(fed_rows[0]["test_msa"]), abs=1e-9)
  # Every arm is scored on the same held-out objects, on both prompts.
  for a in saved["arms"]:
    assert {p: r["num_objects"] for p, r in a["results"].items()} == {
        "box": zero["num_objects"], "box_corrections": zero["num_objects"]}
    assert set(a["results"]["box"]["by_client"]) == {"site_0", "site_1"}
  md = (root / compare.TABLE_FILE).read_text()
  assert "**box_corrections prompts**" in md and "| local_only |" in md
  # The own-site view: each site's model on its own held-out client, personalized too.
  own = saved["table"]["box"]["own_site"]
  assert own["sites"] == {"site_0": "site_0", "site_1": "site_1"}
  assert list(own["rows"]) == ["zero_shot", "local_only", "centralized", "federated",
                               "personalized", "fed_lora"]
  personalized = summaries["federated"]["personalized"]["sites"]
  assert own["rows"]["personalized"]["dice"]["site_1"]["mean"] == pytest.approx(
      personalized["site_1"]["by_prompt"]["box"]["personalized"]["dice"])
  assert "personalized" not in summaries["local/site_0"]
  assert "**box prompts, each site on its own held-out client**" in md
  assert md.strip() in result.stdout
  assert (root / compare.PLOT_FILE).stat().st_size > 10_000
  # A second run skips every completed arm, the zero-shot one included.
  again = run_binary("compare", *args)
  assert again.code == 0 and again.stdout.count("this run is complete") == 6
  assert json.loads((root / compare.COMPARE_FILE).read_text())["table"] == saved["table"]
  # Its own flags are checked once.
  bad = run_binary("compare", *args, "--train_clients=site_0")
  assert bad.code == 1 and bad.error_lines() == [
      "error: --train_clients: and --pool_clients choose the arms' clients themselves; "
      "drop them"]
