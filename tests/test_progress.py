"""Progress inside a round (`federated.progress`), from the files the pipeline writes."""

import io
import os

from tff_sam.federated.program import progress


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def _write(folder, client, batches):
  (folder / client).write_text(str(batches))


def test_describe_counts_clients_and_images():
  line = progress.describe({"a@2": 3, "b@2": 1}, expected={"a@2": 3, "b@2": 2},
                           images={"a@2": 5, "b@2": 4}, batch_size=2, elapsed=12.4,
                           round_num=2)
  # a: 3 batches of 2 = 6, capped at its 5 images; b: 1 batch = 2 images.
  assert line == "  round 2: 1/2 clients done, 7/9 images trained, 12 s"


def test_read_batches_tolerates_missing_and_partial_files(tmp_path):
  assert progress.read_batches(tmp_path / "nope") == 0
  (tmp_path / "empty").write_text("")
  assert progress.read_batches(tmp_path / "empty") == 0
  (tmp_path / "junk").write_text("3x")
  assert progress.read_batches(tmp_path / "junk") == 0
  (tmp_path / "ok").write_text("7")
  assert progress.read_batches(tmp_path / "ok") == 7


def test_one_line_per_finished_client_when_not_a_terminal(tmp_path):
  lines = []
  reporter = progress.RoundProgress(
      progress_dir=tmp_path, round_num=4, expected={"a@4": 2, "b@4": 3},
      images={"a@4": 4, "b@4": 6}, batch_size=2, log=lines.append, stream=io.StringIO(),
      interval=3600)
  _write(tmp_path, "a@4", 9)  # Left by an earlier attempt at this round: ignored.
  with reporter:
    assert not (tmp_path / "a@4").exists()
    reporter.poll()
    assert not lines
    _write(tmp_path, "a@4", 2)
    _write(tmp_path, "b@4", 1)
    reporter.poll()
    reporter.poll()  # Reported once.
    assert lines == ["  round 4: 1/2 clients done, 6/10 images trained, 0 s  (a finished)"]
    _write(tmp_path, "b@4", 3)
  # The final look on exit reports b, then the files are removed.
  assert len(lines) == 2 and lines[1].startswith("  round 4: 2/2 clients done, 10/10 images")
  assert lines[1].endswith("(b finished)")
  assert not list(tmp_path.iterdir())


def test_clients_finishing_between_two_looks_count_up_in_their_order(tmp_path):
  """Both done at one look: 1/2 for the one that finished first (its file's last write),
  then 2/2; never 2/2 for the first."""
  lines = []
  reporter = progress.RoundProgress(
      progress_dir=tmp_path, round_num=2, expected={"a@2": 1, "b@2": 1},
      images={"a@2": 2, "b@2": 2}, batch_size=2, log=lines.append, stream=io.StringIO(),
      interval=3600)
  with reporter:
    _write(tmp_path, "b@2", 1)
    _write(tmp_path, "a@2", 1)
    os.utime(tmp_path / "b@2", (1000, 1000))  # b finished first.
    os.utime(tmp_path / "a@2", (2000, 2000))
    reporter.poll()
  assert [line.split(", ")[0] for line in lines] == ["  round 2: 1/2 clients done",
                                                     "  round 2: 2/2 clients done"]
  assert lines[0].endswith("(b finished)") and lines[1].endswith("(a finished)")


def test_terminal_gets_one_updating_line_cleared_at_the_end(tmp_path):
  terminal = _Terminal()
  lines = []
  with progress.RoundProgress(progress_dir=tmp_path, round_num=1, expected={"a@1": 1},
                              images={"a@1": 2}, batch_size=2, log=lines.append,
                              stream=terminal, interval=3600) as reporter:
    reporter.poll()
    _write(tmp_path, "a@1", 1)
    reporter.poll()
  text = terminal.getvalue()
  assert not lines  # Nothing in the log: the line updates in place.
  assert text.count("\n") == 0
  assert "\r\033[K  round 1: 0/1 clients done" in text
  assert "\r\033[K  round 1: 1/1 clients done, 2/2 images trained" in text
  assert text.endswith("\r\033[K")  # Cleared: what follows starts on a clean line.
