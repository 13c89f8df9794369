"""Checkpoint and resume: same result as an uninterrupted run, each round once.

Includes a real `kill -9` of a running `python -m tff_sam.experiments.run`.
"""

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import shutil

import psutil
import pytest

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam import output_folder
from tff_sam.federated.program import program
from tff_sam.federated.program import run_folder
from tff_sam.models import build

from conftest import BackgroundCli
from conftest import live_worker_binaries
from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]


def _rounds(out: Path) -> list[int]:
  with open(out / "metrics.csv") as f:
    return [int(r["round"]) for r in csv.DictReader(f)]


@pytest.fixture(name="reference")
def _reference(reference_run):
  """The session's uninterrupted reference run: (output folder, summary)."""
  return reference_run.out, reference_run.summary


def test_reference_saves_bounded_state_versions(reference, reference_settings):
  out, _ = reference
  rounds = reference_settings["rounds"]
  saved = sorted(p.name for p in (out / run_folder.STATE_DIR).iterdir())
  assert saved == [f"round_{r}" for r in range(rounds - run_folder.KEEP_STATES + 1, rounds + 1)]
  assert _rounds(out) == list(range(rounds + 1))


@pytest.mark.slow
def test_resume_after_crash_between_metrics_and_state(tmp_path, reference, reference_settings):
  """A crash after round 3's metrics were written but before its state was saved."""
  ref_out, ref_summary = reference
  assert reference_settings["rounds"] == 4
  out = tmp_path / "crashed"
  shutil.copytree(ref_out, out)
  shutil.rmtree(out / "state" / "round_4")
  shutil.rmtree(out / "state" / "round_3")
  (out / "summary.json").unlink()
  # Leftover of a save interrupted mid-way: must be ignored and removed.
  (out / "state" / "round_3_temp1234").mkdir()
  config = config_lib.RunConfig(output_dir=str(out), **reference_settings)
  lines = []
  summary = program.run_experiment(config, log=lines.append)
  assert any(line.startswith("resuming") and "after round 2/4" in line for line in lines)
  assert _rounds(out) == list(range(5))  # Rounds 3, 4 redone, each once.
  assert not (out / "state" / "round_3_temp1234").exists()
  for key in ("baseline", "final"):
    for metric in ("dice", "iou"):
      assert summary[key][metric] == pytest.approx(ref_summary[key][metric], abs=1e-5)


@pytest.mark.slow
def test_other_settings_are_refused_naming_the_flags(tmp_path, reference, reference_settings):
  out = tmp_path / "copy"
  shutil.copytree(reference[0], out)
  settings = dict(reference_settings)
  settings.update(client_lr=1e-4, seed=6)
  config = config_lib.RunConfig(output_dir=str(out), **settings)
  with pytest.raises(errors.ConfigError) as info:
    program.run_experiment(config, log=lambda _: None)
  message = str(info.value)
  assert "--client_lr" in message and "--seed" in message and "--fresh" in message
  assert "\n" not in message
  # --fresh starts over in the same folder.
  settings.update(rounds=1)
  config = config_lib.RunConfig(output_dir=str(out), **settings)
  program.run_experiment(config, fresh=True, log=lambda _: None)
  assert _rounds(out) == [0, 1]
  assert json.loads((out / "config.json").read_text())["seed"] == 6


def test_rerun_of_a_finished_run_is_a_no_op(tmp_path, reference, reference_settings,
                                            monkeypatch):
  out = tmp_path / "done"
  shutil.copytree(reference[0], out)
  # Untouched but its lock file (which names the command that last held the folder).
  before = {p: p.read_bytes() for p in out.rglob("*")
            if p.is_file() and p.name != output_folder.LOCK_FILE}
  monkeypatch.setattr(build, "load_sam", lambda *a, **k: pytest.fail("model loaded"))
  lines = []
  config = config_lib.RunConfig(output_dir=str(out), **reference_settings)
  summary = program.run_experiment(config, log=lines.append)
  assert len(lines) == 1 and "this run is complete (4 rounds" in lines[0], lines
  assert "nothing to do" in lines[0]
  assert summary == json.loads((out / "summary.json").read_text())
  assert {p: p.read_bytes() for p in out.rglob("*")
          if p.is_file() and p.name != output_folder.LOCK_FILE} == before
  # Other settings are still refused, not mistaken for a finished run.
  with pytest.raises(errors.ConfigError, match="^--seed"):
    program.run_experiment(dataclasses.replace(config, seed=99), log=lines.append)


def test_other_execution_and_settings_older_runs_lack_resume(tmp_path, reference,
                                                            reference_settings):
  """`--execution` may change on resume; a setting missing from an older config.json is
  its default (so runs saved before it existed still resume)."""
  out = tmp_path / "copy"
  shutil.copytree(reference[0], out)
  saved = json.loads((out / "config.json").read_text())
  assert saved["execution"] == "tf"
  saved["execution"] = "cpp"  # E.g. a run started before tf was the default.
  del saved["client_optimizer"]
  del saved["site_test_clients"]  # A list setting: its default () is saved as [].
  (out / "config.json").write_text(json.dumps(saved))
  config = config_lib.RunConfig(output_dir=str(out), **reference_settings)
  run_folder.check_resumable(out, config, [reference_settings["rounds"]])
  with pytest.raises(errors.ConfigError, match="^--client_optimizer"):
    run_folder.check_resumable(out, dataclasses.replace(config, client_optimizer="sgd"),
                            [reference_settings["rounds"]])


def test_a_zero_round_run_saved_before_a_setting_existed_is_complete(tmp_path):
  """A 0-round run (zero-shot) saves no state: its summary's settings decide, and a
  setting the summary lacks counts as its default; another value is not complete."""
  config = config_lib.RunConfig(output_dir=str(tmp_path), rounds=0)
  saved = config.to_dict()
  del saved["pred_iou_thresh"]
  summary = {"rounds": 0, "config": saved}
  (tmp_path / "summary.json").write_text(json.dumps(summary))
  (tmp_path / "model").mkdir()
  (tmp_path / "model" / "config.json").write_text("{}")
  assert run_folder.completed_summary(tmp_path, config, []) == summary
  other = dataclasses.replace(config, eval_prompt=("point", "automatic"), pred_iou_thresh=0.7)
  assert run_folder.completed_summary(tmp_path, other, []) is None


@pytest.mark.slow
def test_more_rounds_continue_a_finished_run(tmp_path, reference, reference_settings):
  """Also: a round released twice in `metrics.csv` (e.g. by two runs sharing the folder
  before folders were locked) does not survive the resume."""
  out = tmp_path / "longer"
  shutil.copytree(reference[0], out)
  with open(out / "metrics.csv") as f:
    text = f.read()
  header, *rows = text.splitlines(keepends=True)
  (out / "metrics.csv").write_text(header + rows[0] + "".join(rows))  # Round 0 twice.
  assert _rounds(out) == [0, 0, 1, 2, 3, 4]
  lines = []
  config = config_lib.RunConfig(output_dir=str(out), **{**reference_settings, "rounds": 5})
  summary = program.run_experiment(config, log=lines.append)
  assert any(line.startswith("resuming") and "after round 4/5" in line for line in lines)
  assert "  metrics.csv had round(s) 0 more than once; kept the last row of each" in lines
  assert _rounds(out) == list(range(6))
  assert summary["rounds"] == 5
  runs = summary["invocations"]  # The reference run's, then this one's.
  assert [r["resumed_after_round"] for r in runs] == [None, 4]
  assert [r["rounds_done"] for r in runs] == [4, 5] and all(r["finished"] for r in runs)
  assert runs[0] == reference[1]["invocations"][0]
  assert summary["wall_time_s"] == pytest.approx(sum(r["wall_time_s"] for r in runs), abs=0.02)
  assert json.loads((out / run_folder.INVOCATIONS_FILE).read_text()) == runs
  with pytest.raises(errors.ConfigError, match="^--rounds: .* already 5 rounds long"):
    program.run_experiment(dataclasses.replace(config, rounds=3), log=lines.append)


def _invocations_agree_with_the_state(out: Path) -> list[dict]:
  """Each entry of `invocations.json` ends where the next one resumed; the last one at
  the newest saved round."""
  runs = json.loads((out / run_folder.INVOCATIONS_FILE).read_text())
  for before, after in zip(runs, runs[1:]):
    assert before["rounds_done"] == after["resumed_after_round"], runs
  assert runs[-1]["rounds_done"] == max(run_folder.saved_versions(out), default=0), runs
  return runs


def _cli(out, settings):
  s = settings
  return [sys.executable, "-m", "tff_sam.experiments.run", f"--output_dir={out}",
          *[f"--{k}={v}" for k, v in s.items()]]


@pytest.mark.slow
def test_kill_9_under_cpp_ends_its_worker_and_resumes(tmp_path, reference, reference_settings):
  """`--execution=cpp`: kill -9 of the run; its worker's guardian ends the worker, and the
  same command completes with the reference run's result (which ran under tf)."""
  out = tmp_path / "killed"
  cmd = [*_cli(out, reference_settings), "--execution=cpp"]
  cli = BackgroundCli(cmd, tmp_path / "stderr.txt")
  proc = cli.process
  try:
    cli.wait_until((out / "state" / "round_2").exists)
    workers = live_worker_binaries(proc.pid)
    assert workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    for child in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
      child.kill()
  # The parent could run no clean-up; the worker's guardian ends it within seconds.
  _, alive = psutil.wait_procs(workers, timeout=5)
  for worker in alive:
    worker.kill()
  assert not alive, "TFF worker_binary outlived its kill -9'd run by 5 s"
  assert proc.returncode == -signal.SIGKILL
  assert not (out / "summary.json").exists()

  again = run_cli(cmd, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming" in again.stdout
  assert _rounds(out) == list(range(reference_settings["rounds"] + 1))
  runs = _invocations_agree_with_the_state(out)  # The killed command's entry included.
  assert [r["finished"] for r in runs] == [False, True]
  summary = json.loads((out / "summary.json").read_text())
  ref = reference[1]
  for key in ("baseline", "final"):
    for metric in ("dice", "iou"):
      assert summary[key][metric] == pytest.approx(ref[key][metric], abs=1e-5)


@pytest.mark.slow
def test_kill_9_then_same_command_equals_uninterrupted(tmp_path, reference, reference_settings):
  """kill -9 after round 1 is saved; the same command completes, equal in every metric of
  rounds 0-2 to the session's uninterrupted reference run.

  Like with like: both ran under tf (the default) in processes of this machine, so a
  resume that changed anything (prompts, sampling, state) shows at 1e-6.
  """
  settings = {**reference_settings, "rounds": 2}
  out = tmp_path / "killed"
  cmd = _cli(out, settings)
  cli = BackgroundCli(cmd, tmp_path / "stderr.txt")
  proc = cli.process
  cli.wait_until((out / "state" / "round_1").exists)
  assert not live_worker_binaries(proc.pid)  # tf starts no TFF worker.
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait(timeout=30)
  assert not (out / "summary.json").exists()
  again = run_cli(cmd, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming" in again.stdout and "execution: tf" in again.stdout
  assert again.stdout.startswith("execution: tf ("), again.stdout[:200]
  with open(reference[0] / "metrics.csv") as f:
    want = [r for r in csv.DictReader(f) if int(r["round"]) <= 2]
  with open(out / "metrics.csv") as f:
    got = list(csv.DictReader(f))
  assert [r["round"] for r in got] == ["0", "1", "2"]
  _invocations_agree_with_the_state(out)
  for g, w in zip(got, want):
    for key, value in w.items():
      if key != "seconds" and value:
        assert float(g[key]) == pytest.approx(float(value), rel=1e-6, abs=1e-7), (g["round"], key)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_ends_run_and_its_worker(tmp_path, reference_settings, sig):
  """Ctrl-C or SIGTERM while TFF works (its worker is running), after round 1 was saved,
  ends run and worker, and `invocations.json` says how far it got."""
  out = tmp_path / f"sig{int(sig)}"
  cli = BackgroundCli([*_cli(out, reference_settings), "--execution=cpp"],
                      tmp_path / "stderr.txt")
  proc = cli.process
  cli.wait_until((out / "state" / "round_1").exists)
  workers = cli.wait_until(lambda: live_worker_binaries(proc.pid))
  proc.send_signal(sig)
  proc.wait(timeout=120)
  assert proc.returncode != 0
  assert "Traceback" not in cli.stderr()
  _, alive = psutil.wait_procs(workers, timeout=10)
  assert not alive, "TFF worker_binary outlived the run"
  last = _invocations_agree_with_the_state(out)[-1]  # Its bookkeeping was done.
  assert last["interrupted"] is True and last["finished"] is False
  assert last["rounds_done"] >= 1


@pytest.mark.slow
def test_oom_killed_worker_ends_run_with_one_error_line(tmp_path, reference_settings):
  """TFF restarts a killed worker and retries the round forever; the run must end."""
  out = tmp_path / "oom"
  cli = BackgroundCli([*_cli(out, reference_settings), "--execution=cpp"],
                      tmp_path / "stderr.txt")
  proc = cli.process
  cli.wait_until((out / "state" / "round_1").exists)
  workers = live_worker_binaries(proc.pid)
  assert workers
  for worker in workers:
    worker.send_signal(signal.SIGKILL)  # As the kernel's out-of-memory killer does.
  try:
    proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
      proc.kill()
  stderr = cli.stderr()
  assert proc.returncode == 1, stderr[-2000:]
  assert "Traceback" not in stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith("error: TFF's worker_binary (pid ") and "died during round" in last, last


@pytest.mark.slow
def test_subrounds_give_the_same_rounds(tmp_path, reference, reference_settings):
  """`--clients_per_subround`: TFF's mergeable execution, one client per subround.

  Runs in fresh processes: replacing a live TFF context in this one makes TFF stop its
  old worker with SIGINT and wait for it, which can hang.
  """
  code = ("import tensorflow_federated as tff; from tff_sam.federated.backends import execution; "
          "execution.configure_tff_execution(execution='cpp', num_subrounds=2); "
          "print(type(tff.framework.get_context_stack().current).__name__)")
  probe = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300, check=False)
  assert probe.stdout.strip() == "MergeableCompExecutionContext", probe.stderr[-2000:]

  out = tmp_path / "sub"
  cmd = [*_cli(out, reference_settings), "--rounds=2", "--clients_per_subround=1",
         "--execution=cpp"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((out / "config.json").read_text())["clients_per_subround"] == 1
  with open(reference[0] / "metrics.csv") as f:
    want = list(csv.DictReader(f))[:3]
  with open(out / "metrics.csv") as f:
    got = list(csv.DictReader(f))
  assert [r["round"] for r in got] == ["0", "1", "2"]
  for g, w in zip(got, want):
    for key in ("train_loss", "test_dice", "test_iou", "fed_eval_dice"):
      if w[key]:
        assert float(g[key]) == pytest.approx(float(w[key]), rel=1e-4, abs=1e-6), (g["round"], key)


def test_metrics_are_rewritten_to_the_saved_rounds_and_a_missing_one_is_refused(tmp_path):
  path = tmp_path / "metrics.csv"
  path.write_text("round,train_loss\n0,\n1,0.5\n1,0.4\n2,0.3\n3,0.2\n")
  assert run_folder.rewrite_saved_metrics(tmp_path, 2) == [1]
  assert path.read_text() == "round,train_loss\n0,\n1,0.4\n2,0.3\n"  # Last row kept; 3 gone.
  assert run_folder.rewrite_saved_metrics(tmp_path, 2) == []
  path.write_text("round,train_loss\n0,\n2,0.3\n")
  with pytest.raises(errors.DataError, match=r"metrics.csv: lacks round\(s\) 1 of the saved "
                     r"state \(round 2\); pass --fresh to start over$"):
    run_folder.rewrite_saved_metrics(tmp_path, 2)
