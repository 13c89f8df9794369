"""End-to-end tests of the main job: the program on its own, and the CLI binaries."""

import csv
import dataclasses
import json
import os
import re
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam.data import cache
from tff_sam.data import synthetic
from tff_sam import errors
from tff_sam.evaluation import heldout
from tff_sam.export import formats
from tff_sam.export import pretrained
from tff_sam.federated.program import program
from tff_sam.federated.program import run_data
from tff_sam.federated.program import run_folder
from tff_sam.models import build

from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path, data_dir, cache_dir, **overrides):
  values = dict(output_dir=str(tmp_path / "out"), data_dir=str(data_dir),
                cache_dir=str(cache_dir), model="tiny", rounds=2, clients_per_round=2,
                local_epochs=1, batch_size=2, prompts_per_image=2, client_lr=3e-3,
                eval_every=1, seed=3)
  values.update(overrides)
  return config_lib.RunConfig(**values).validate()


def _run_cli(args, env_extra=None, timeout=600):
  env = dict(os.environ)
  env.update(env_extra or {})
  return run_cli([sys.executable, "-m", *args], env=env, timeout=timeout)


def _tensorboard(folder: Path) -> dict[str, dict[int, object]]:
  """Tag -> step -> value (a float, or the image's encoded bytes) from event files."""
  found = {}
  for path in sorted(folder.glob("events.out.tfevents.*")):
    for event in tf.data.TFRecordDataset(str(path)):
      e = tf.compat.v1.Event.FromString(event.numpy())
      for v in e.summary.value:
        arr = tf.make_ndarray(v.tensor)
        found.setdefault(v.tag, {})[e.step] = float(arr) if arr.ndim == 0 else arr
  return found


def test_program_writes_outputs_and_export_reproduces_final_metrics(reference_run):
  config, out, summary, lines = (reference_run.config, reference_run.out,
                                 reference_run.summary, reference_run.lines)
  cache_dir = config.cache_dir
  rounds = config.rounds
  sites = ["site_0", "site_1", "site_2"]

  with open(out / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["round"]) for r in rows] == list(range(rounds + 1))
  # Every column is documented (METRIC_DOCS, README), per-client ones once per site;
  # no validation columns without validation.
  documented = {k.replace("<client>", s) if "<client>" in k else k
                for k in run_folder.METRIC_DOCS for s in sites}
  assert set(rows[0]) == documented - {"val_loss", "val_dice"} | {"round"}
  assert rows[0]["train_loss"] == "" and float(rows[0]["test_dice"]) >= 0
  assert all(float(r["train_loss"]) > 0 for r in rows[1:])
  assert all(0 <= float(r["test_dice"]) <= 1 for r in rows)
  # Federated evaluation on the three held-out clients, with the current global model.
  assert all(0 <= float(r["fed_eval_dice"]) <= 1 and float(r["fed_eval_loss"]) > 0
             for r in rows)
  assert rows[0]["fed_eval_loss"] != rows[rounds]["fed_eval_loss"]
  for r in rows:
    per_site = [float(r[f"test_dice/{s}"]) for s in sites]
    assert min(per_site) <= float(r["test_dice"]) <= max(per_site)
  # Robust aggregation is on by default; healthy clients are neither zeroed nor dropped.
  for r in rows[1:]:
    assert r["nonfinite_clients"] == "0" and r["zeroed_clients"] == "0"
    assert int(r["clipped_clients"]) >= 0 and float(r["clipping_norm"]) > 0
  assert rows[0]["clipped_clients"] == ""
  # The same releases as TensorBoard scalars, plus the overlays as images.
  board = _tensorboard(out / "tensorboard")
  assert set(board["test_dice"]) == set(range(rounds + 1))
  assert set(board["train_loss"]) == set(range(1, rounds + 1))
  assert board["fed_eval_dice"][rounds] == pytest.approx(float(rows[rounds]["fed_eval_dice"]))
  images = [t for t in board if t.startswith("overlays/")]
  assert len(images) == len(summary["overlays"]) and images
  assert all(set(board[t]) == {rounds} for t in images)

  saved = json.loads((out / "summary.json").read_text())
  assert saved["config"] == config.to_dict()
  assert saved["rounds"] == rounds and saved["wall_time_s"] > 0
  assert set(saved["baseline"]) >= {"dice", "iou"} and set(saved["final"]) >= {"dice", "iou"}
  assert saved["final"]["dice"] == pytest.approx(float(rows[-1]["test_dice"]), abs=1e-6)
  assert json.loads((out / "config.json").read_text()) == config.to_dict()
  assert sum(1 for line in lines if line.startswith("round ")) == rounds + 1  # 0..rounds
  assert summary == saved
  assert saved["evaluation_clients"] == sites == saved["federated_evaluation_clients"]
  assert saved["aggregation"] == {"nonfinite_clients": 0, "zeroed_clients": 0,
                                  "clipped_clients": saved["aggregation"]["clipped_clients"]}
  assert saved["final"]["federated_eval"]["dice"] == float(rows[-1]["fed_eval_dice"])

  # The exported model loads with from_pretrained and reproduces the final metrics.
  bundle = build.load_sam(str(out / "model"))
  splits = run_data.prepare_data(config, Path(cache_dir))
  records, _ = cache.build_records(list(splits.test), bundle=bundle, cache_root=Path(cache_dir),
                                        binary_components=False, batch_size=4, show_progress=False)
  evaluator = heldout.Evaluator(
      examples=list(splits.test), records=records, bundle=bundle,
      clients=[c for c, exs in splits.test_clients.items() for _ in exs])
  result = evaluator(build.build_prompt_mask_decoder(bundle))
  assert result.dice == pytest.approx(saved["final"]["dice"], abs=1e-9)
  assert result.iou == pytest.approx(saved["final"]["iou"], abs=1e-9)
  assert {c: v["dice"] for c, v in result.by_client.items()} == pytest.approx(
      saved["final"]["dice_by_client"], abs=1e-9)
  assert sum(v["num_objects"] for v in result.by_client.values()) == result.num_objects
  # Fine-tuning changed the decoder: the export differs from the pretrained tiny model.
  base = build.load_sam("tiny")
  changed = [not np.array_equal(a.numpy(), b.numpy()) for a, b in
             zip(base.sam.mask_decoder.weights, bundle.sam.mask_decoder.weights)]
  assert any(changed)
  # Alternating models, as the overlays do, retraces nothing: one function per model
  # (at most one more trace to relax the number of prompts).
  zero, tuned = build.build_prompt_mask_decoder(base), build.build_prompt_mask_decoder(bundle)
  for image in evaluator.images:
    evaluator.predict(zero, image)
    evaluator.predict(tuned, image)
  for model in (zero, tuned):
    assert evaluator._compiled(model).experimental_get_tracing_count() <= 2  # pylint: disable=protected-access
  # The (frozen) image encoder and prompt encoder are exported unchanged.
  assert base.fingerprint == bundle.fingerprint
  for a, b in zip(base.sam.prompt_encoder.weights, bundle.sam.prompt_encoder.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_sample_clients_is_deterministic_per_round():
  ids = [f"c{i}" for i in range(10)]
  a = program.sample_clients(ids, round_num=4, clients_per_round=3, seed=1)
  assert a == program.sample_clients(ids, round_num=4, clients_per_round=3, seed=1)
  assert len(set(a)) == 3 and set(a) <= set(ids)
  rounds = {tuple(program.sample_clients(ids, round_num=r, clients_per_round=3, seed=1))
            for r in range(1, 8)}
  assert len(rounds) > 1
  assert program.sample_clients(ids[:2], round_num=1, clients_per_round=5, seed=1) == ids[:2]


def test_program_refuses_data_without_test_split(tmp_path, reference_cache):
  root = synthetic.generate(tmp_path / "d", images_per_site=1, test_per_site=0)
  config = _config(tmp_path, root, reference_cache)
  with pytest.raises(errors.ConfigError, match="--test_fraction"):
    program.run_experiment(config, log=lambda _: None)


def test_config_validation_names_the_flag():
  with pytest.raises(errors.ConfigError, match="^--rounds:"):
    config_lib.RunConfig(output_dir="x", rounds=-1).validate()
  with pytest.raises(errors.ConfigError, match="^--prompt:"):
    config_lib.RunConfig(output_dir="x", prompt="lasso").validate()
  with pytest.raises(errors.ConfigError, match="^--client_lr:"):
    config_lib.RunConfig(output_dir="x", client_lr=0).validate()
  with pytest.raises(errors.ConfigError, match="^--clipping_quantile: must be in"):
    config_lib.RunConfig(output_dir="x", clipping_quantile=1.0).validate()
  with pytest.raises(errors.ConfigError, match="^--zeroing_multiplier:"):
    config_lib.RunConfig(output_dir="x", zeroing_multiplier=0).validate()
  with pytest.raises(errors.ConfigError, match="^--clients_per_subround: must be >= 0"):
    config_lib.RunConfig(output_dir="x", clients_per_subround=-1).validate()
  for per_subround, subrounds in ((0, 1), (1, 5), (2, 3), (5, 1), (9, 1)):
    assert config_lib.RunConfig(output_dir="x", clients_per_round=5,
                                clients_per_subround=per_subround).num_subrounds == subrounds


@pytest.mark.parametrize("case", ["image_without_mask", "size_mismatch", "unreadable"])
def test_data_mistakes_are_one_line_errors(tmp_path, reference_data, reference_cache, case):
  root = tmp_path / "bad"
  shutil.copytree(reference_data, root)
  site = root / "site_0"
  victim = sorted((site / "images").iterdir())[0]
  mask = site / "masks" / (victim.stem + ".png")
  if case == "image_without_mask":
    mask.unlink()
    expected = victim.name
  elif case == "size_mismatch":
    cv2.imwrite(str(mask), np.zeros((10, 10), np.uint16))
    expected = mask.name
  else:
    victim.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    expected = victim.name
  config = _config(tmp_path, root, reference_cache)
  with pytest.raises(errors.DataError) as info:
    program.run_experiment(config, log=lambda _: None)
  message = str(info.value)
  assert expected in message and "\n" not in message


def test_cli_help_documents_every_flag_by_topic():
  proc = _run_cli(["tff_sam.experiments.run", "--help"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  for field in dataclasses.fields(config_lib.RunConfig):
    documented = (f"--{field.name}:" in proc.stdout or f"--[no]{field.name}:" in proc.stdout)
    assert documented, field.name
  assert "mobile_sam" in proc.stdout
  # Topics in order; each flag under its topic.
  headings = [line[:-1] for line in proc.stdout.splitlines()
              if line.endswith(":") and not line.startswith(" ")]
  assert headings == ["data", "model", "prompts", "training (on each client)",
                      "federated (rounds and aggregation)", "privacy and communication",
                      "evaluation", "automatic segmentation (--eval_prompt=automatic)",
                      "personalization", "output"]
  sections = re.split(r"\n(?=[a-z][^\n]*:\n)", proc.stdout)[1:]
  listed = [re.findall(r"^  --(?:\[no\])?(\w+):", part, re.M) for part in sections]
  flat = [name for names in listed for name in names]
  fields = {f.name for f in dataclasses.fields(config_lib.RunConfig)}
  assert len(flat) == len(set(flat)) and set(flat) == fields | {"fresh"}  # Each flag once.
  assert "data_dir" in listed[0] and "model" in listed[1] and "rounds" in listed[4]
  assert "dp_noise_multiplier" in listed[5] and "secure_aggregation" in listed[5]


@pytest.mark.parametrize("binary", ["bench", "compare", "evaluate", "export", "predict",
                                    "prepare_sample_data", "worker"])
def test_every_binary_answers_help_with_its_flags_and_exit_0(binary):
  """absl itself exits 1 after `--help`; every binary of this package exits 0."""
  proc = _run_cli([f"tff_sam.experiments.{binary}", "--help"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"tff_sam/experiments/{binary}.py:" in proc.stdout or binary == "compare"
  assert re.search(r"^  --\w+:", proc.stdout, re.M), proc.stdout[:500]


def test_export_help_names_the_files_it_writes():
  proc = _run_cli(["tff_sam.experiments.export", "--help"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in (formats.SAM_CHECKPOINT, formats.ONNX_ENCODER, formats.ONNX_DECODER,
               formats.SAVED_MODEL, pretrained.TORCH_WEIGHTS, build.TF_WEIGHTS):
    assert name in proc.stdout, name
  assert "model.safetensors" not in proc.stdout  # Not written (`export.pretrained`).


_PROBE = ("import atexit, runpy, sys\n"
          "atexit.register(lambda: print('tensorflow loaded:', 'tensorflow' in sys.modules))\n"
          "sys.argv = sys.argv[1:]\n"
          "runpy.run_module(sys.argv[0], run_name='__main__')\n")


@pytest.mark.parametrize("args, line", [
    (["run", "--rounds=-1"], "error: --rounds: must be >= 0"),
    (["run", "--batch_size", "0"], "error: --batch_size: must be >= 1"),
    (["run", "--execution=tf", "--workers=a:1"], "error: --workers: runs the rounds on TFF"),
    (["compare", "--seeds=0"], "error: --seeds: must be >= 1, got 0"),
    (["compare", "--arms=solo"], "error: --arms: must list arms of"),
    (["run", "--labels_per_site=1,2"], "error: --labels_per_site: takes one count for a run"),
    (["compare", "--labels_per_site=0,all"], "error: --labels_per_site: takes counts >= 1 or "
     "all, got '0'"),
    (["bench", "--rounds=1"], "error: --rounds: must be >= 2"),
    (["export", "--model=m", "--format=pt"], "error: --format: must be one of"),
    (["predict"], "error: --image: is required"),
    (["run", "runs/x"], "error: unexpected arguments: runs/x (flags are written --name=value"),
    (["run", "--nosuchflag"], "error: Unknown command line flag 'nosuchflag' (--help lists"),
    (["run", "--flagfile=/nonexistent/f"], "error: Unable to open flagfile: [Errno 2] No such"),
    (["bench", "--rounds=abc"], "error: flag --rounds=abc: invalid literal for int()"),
])
def test_flag_mistakes_are_answered_before_tensorflow_loads(args, line):
  """One line, exit 1, and TensorFlow never imported (it takes seconds to load)."""
  binary, *flags_ = args
  proc = run_cli([sys.executable, "-c", _PROBE, f"tff_sam.experiments.{binary}", *flags_],
                 timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-2000:]
  assert proc.stderr.startswith(line), proc.stderr
  assert proc.stdout.strip().splitlines()[-1] == "tensorflow loaded: False", proc.stdout


def test_rounds_report_their_clients_as_they_finish(reference_run, reference_settings):
  """Inside each round: one line per client that finished (the log is not a terminal)."""
  lines = reference_run.lines
  for r in range(1, reference_settings["rounds"] + 1):
    mine = [line for line in lines if line.startswith(f"  round {r}: ") and "finished" in line]
    assert len(mine) == 2, lines  # clients_per_round
    assert mine[0].startswith(f"  round {r}: 1/2 clients done")  # Even if both at once.
    assert mine[1].startswith(f"  round {r}: 2/2 clients done")
    total = int(re.search(r"/(\d+) images trained", mine[1]).group(1))
    assert f"{total}/{total} images trained" in mine[1]
    # Before the round's own line, as is the announcement of its evaluation.
    end = next(i for i, line in enumerate(lines) if line.startswith(f"round {r}/"))
    assert lines.index(mine[1]) < end
    assert lines[end - 1].startswith(f"  round {r}: held-out evaluation (")


def test_defaults_are_real_models():
  assert config_lib.RunConfig(output_dir="x").model == config_lib.MOBILE_SAM_MODEL
  for binary in ("run", "evaluate", "predict"):
    text = (REPO / "tff_sam" / "experiments" / f"{binary}.py").read_text()
    assert 'flags.DEFINE_string("model", ' in text
    assert ('config_lib.MOBILE_SAM_MODEL' in text.split('flags.DEFINE_string("model", ')[1][:40]
            or '_F["model"]' in text.split('flags.DEFINE_string("model", ')[1][:40]), binary


@pytest.mark.parametrize("args,expected", [
    (["--data_dir=/nonexistent/tff_sam_data"], "/nonexistent/tff_sam_data: data directory not found"),
    (["--model=/nonexistent/model_dir"], "--model /nonexistent/model_dir: not found"),
    (["--model=mobilesam"], "did you mean --model mobile_sam?"),
    (["--model=runs/demo/modle"], "--model runs/demo/modle: not found"),
    (["--model=facebook/sam-vit-base"], "Hub (https://huggingface.co) cannot be reached"),
    (["--rounds=-3"], "--rounds: must be >= 0"),
    (["--clients_per_round=9"], "--clients_per_round: is 9 but there are only 3 clients"),
])
def test_cli_user_mistakes_exit_nonzero_with_one_line(tmp_path, reference_data, reference_cache,
                                                      offline, run_binary, args, expected):
  del offline
  base = [f"--output_dir={tmp_path / 'o'}", f"--cache_dir={reference_cache}", "--rounds=1"]
  if not any(a.startswith("--model") for a in args):
    base.append("--model=tiny")
  if not any(a.startswith("--data_dir") for a in args):
    base.append(f"--data_dir={reference_data}")
  result = run_binary("run", *base, *args)
  assert result.code == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert len(result.error_lines()) == 1, result.stderr[-2000:]
  assert expected in result.error_lines()[0]


@pytest.mark.slow
def test_cli_flagfile_run_and_evaluate(tmp_path, reference_data, reference_cache, run_binary):
  flagfile = tmp_path / "exp.flags"
  out = tmp_path / "run"
  flagfile.write_text("\n".join([
      f"--data_dir={reference_data}", f"--cache_dir={reference_cache}", f"--output_dir={out}",
      "--model=tiny", "--rounds=1", "--clients_per_round=2", "--prompts_per_image=2", "--prompt=both",
      "--nozeroing", "--clipping_initial_norm=1e-9"]) + "\n")
  result = run_binary("run", f"--flagfile={flagfile}")
  assert result.code == 0, result.stderr[-3000:]
  assert "round 1/1" in result.stdout
  summary = json.loads((out / "summary.json").read_text())
  assert summary["config"]["prompt"] == "both"
  assert summary["config"]["zeroing"] is False
  with open(out / "metrics.csv") as f:
    last = list(csv.DictReader(f))[-1]
  assert last["zeroed_clients"] == "" and last["zeroing_norm"] == ""  # disabled
  assert last["clipped_clients"] == "2" and float(last["clipping_norm"]) == pytest.approx(1e-9)
  assert summary["aggregation"]["clipped_clients"] == 2
  assert "robust aggregation: clipped 2" in result.stdout

  # The evaluate binary's smoke run, in a fresh process.
  report = tmp_path / "eval.json"
  proc = _run_cli(["tff_sam.experiments.evaluate", f"--model={out / 'model'}",
                   f"--data_dir={reference_data}", f"--cache_dir={reference_cache}",
                   f"--output_json={report}", "--eval_prompt=box,point"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(report.read_text())
  assert {"dice", "iou", "num_objects"} <= set(result)
  assert set(result["results"]) == {"box", "point"}
  assert result["split"] == "test" and result["num_objects"] == summary["num_test_objects"]
  assert 0 <= result["dice"] <= 1
  # The run's own numbers, client by client: evaluate speaks run's language.
  run_box = summary["evaluation"]["by_prompt"]["box"]
  assert result["results"]["box"]["dice"] == pytest.approx(run_box["dice"], abs=1e-6)
  assert result["results"]["box"]["by_client"].keys() == run_box["by_client"].keys()
  for client, scores in run_box["by_client"].items():
    assert result["results"]["box"]["by_client"][client] == pytest.approx(scores, abs=1e-6)
