"""One command per output folder, and folders that cannot be written: one line each.

Real processes hold and contend for the locks (`kill -9` included); the file-system
faults a test cannot make for root (a read-only mount, a full disk) are raised by
patching the system calls the claim makes.
"""

import errno
import os
import signal
import subprocess
import sys

import pytest
import tensorflow as tf

from tff_sam import errors
from tff_sam import output_folder

from conftest import BackgroundCli
from conftest import REPO
from conftest import run_cli

_HOLD = ("import sys, time\n"
         "from tff_sam import output_folder\n"
         "with output_folder.claim(sys.argv[1]):\n"
         "  print('held', flush=True)\n"
         "  time.sleep(600)\n")


def _cli(binary, out, settings):
  return [sys.executable, "-m", f"tff_sam.experiments.{binary}", f"--output_dir={out}",
          *[f"--{k}={v}" for k, v in settings.items()]]


def _files(folder):
  return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_second_run_on_a_folder_in_use_is_one_line_and_the_first_goes_on(
    tmp_path, reference_settings):
  """Two real `run` processes on one folder: the second names the folder and the first's
  pid and writes nothing; the first is untouched."""
  out = tmp_path / "out"
  first = BackgroundCli(_cli("run", out, reference_settings), tmp_path / "first.txt")
  try:
    first.wait_until((out / "config.json").exists)
    before = _files(out)
    second = run_cli(_cli("run", out, reference_settings), timeout=300)
    assert second.returncode == 1, second.stderr[-2000:]
    line, = second.stderr.strip().splitlines()
    assert line.startswith(f"error: {out}: is in use by another command (pid "
                           f"{first.process.pid}: -m tff_sam.experiments.run --output_dir={out} ")
    assert line.endswith("); wait for it to end, or choose another output folder"), line
    after = _files(out)
    assert {p: after[p] for p in before} == before  # What the first wrote is unchanged.
    assert first.process.poll() is None  # And it goes on.
  finally:
    first.process.kill()
    first.process.wait(timeout=30)


@pytest.mark.parametrize("binary, extra, folder", [
    ("compare", [], "compare"),
    ("bench", ["--arch=tiny"], ""),
])
def test_compare_and_bench_refuse_a_folder_in_use(tmp_path, reference_settings, binary, extra,
                                                  folder):
  out = tmp_path / "out"
  held = out / folder if folder else out
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(held)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    settings = reference_settings if binary == "compare" else {}
    proc = run_cli([*_cli(binary, out, settings), *extra], timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line, = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {held}: is in use by another command (pid {holder.pid}: ")
    assert sorted(p.name for p in held.iterdir()) == [output_folder.LOCK_FILE]
  finally:
    holder.kill()
    holder.wait(timeout=30)


def test_kill_9_of_the_holder_frees_the_folder(tmp_path):
  out = tmp_path / "out"
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline() == "held\n"
  with pytest.raises(errors.DataError, match=f"pid {holder.pid}: "):
    with output_folder.claim(out):
      pass
  os.kill(holder.pid, signal.SIGKILL)
  holder.wait(timeout=30)
  with output_folder.claim(out) as claimed:  # No stale lock to remove by hand.
    assert claimed == out
    assert (out / output_folder.LOCK_FILE).read_text().startswith(f"pid {os.getpid()}: ")


def test_one_process_cannot_claim_a_folder_twice(tmp_path):
  with output_folder.claim(tmp_path / "out"):
    with pytest.raises(errors.DataError, match="is in use by another command"):
      with output_folder.claim(tmp_path / "out"):
        pass
  with output_folder.claim(tmp_path / "out"):  # Released when the body ended.
    pass


def test_a_file_in_the_way_is_one_line_from_the_binary(tmp_path, reference_settings):
  target = tmp_path / "results.txt"
  target.write_text("mine")
  proc = run_cli(_cli("run", target, reference_settings), timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      f"error: {target}: is a file, not a folder; choose another output folder"]
  assert target.read_text() == "mine"
  below = target / "run"
  with pytest.raises(errors.DataError, match=f"^{below}: cannot be created"):
    with output_folder.claim(below):
      pass


@pytest.mark.parametrize("call, code", [("open", errno.EROFS), ("write", errno.ENOSPC),
                                        ("open", errno.EACCES)])
def test_an_unwritable_folder_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, call, code):
  """A read-only mount, a full disk, no permission: raised where the claim meets them."""
  real = getattr(os, call)

  def failing(*args, **kwargs):
    if call == "write" or str(args[0]).endswith(output_folder.LOCK_FILE):
      raise OSError(code, os.strerror(code), str(args[0]))
    return real(*args, **kwargs)

  monkeypatch.setattr(os, call, failing)
  out = tmp_path / "new" / "run"
  with pytest.raises(errors.DataError) as info:
    with output_folder.claim(out):
      pytest.fail("the body ran")
  assert str(info.value) == f"{out}: cannot be written ({os.strerror(code)})"
  assert not (tmp_path / "new").exists()  # The folders made for the claim are gone.
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "kept.txt").write_text("x")
  with pytest.raises(errors.DataError):
    with output_folder.claim(existing):
      pass
  assert sorted(p.name for p in existing.iterdir()) == ["kept.txt"]  # Not the user's folder.


def test_writing_errors_name_the_file_and_pass_other_errors_on(tmp_path):
  path = tmp_path / "metrics.csv"
  with pytest.raises(errors.DataError) as info:
    with output_folder.writing_errors(tmp_path):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
  assert str(info.value).startswith(f"{path}: cannot be written (No space left on device); ")
  with pytest.raises(FileNotFoundError):
    with output_folder.writing_errors(tmp_path):
      raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))


def test_tensorflow_failing_to_write_a_full_disk_is_one_line(tmp_path):
  """TF's checkpoint writer (the saved state) reports ENOSPC as its own error."""
  tf_error = tf.errors.ResourceExhaustedError(
      None, None, f"{tmp_path}/state/round_1_temp2/variables/x.tempstate1; No space left on "
      "device [Op:SaveV2]")
  with pytest.raises(errors.DataError) as info:
    with output_folder.writing_errors(tmp_path):
      raise tf_error
  assert str(info.value).startswith(f"{tmp_path}: cannot be written (No space left on device)")
  with pytest.raises(tf.errors.ResourceExhaustedError):  # Out of memory is not a disk.
    with output_folder.writing_errors(tmp_path):
      raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
