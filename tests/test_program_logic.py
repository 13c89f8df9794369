"""Tests of the training loop on its own (`federated.program_logic`), with autospec mocks.

No model, data or TFF runtime: the process and TFF's program state and release
managers are `mock.create_autospec` of the real classes, so calls that do not match
their signatures fail. Each test runs in milliseconds.
"""

import itertools
from unittest import mock

import pytest
import tensorflow_federated as tff

from tff_sam.federated.program import program_logic


class _Result:
  """What `next` returns: a new state (the round's number here) and metrics."""

  def __init__(self, state):
    self.state = state
    self.metrics = {"loss": 1.0 / (1 + state)}


def _parts(saved=None):
  """Mocks of the process and managers; `saved` = (state, version) already saved."""
  process = mock.create_autospec(tff.templates.IterativeProcess, instance=True)
  process.next.side_effect = lambda state, clients: _Result(state + 1)
  states = mock.create_autospec(tff.program.FileProgramStateManager, instance=True)
  states.load_latest.return_value = saved if saved is not None else (None, 0)
  releases = mock.create_autospec(tff.program.ReleaseManager, instance=True)
  evaluation = mock.Mock(side_effect=lambda state, round_num: {"test_dice": state / 10})
  return process, states, releases, evaluation


def _train(process, states, releases, evaluation, *, total=3, periodicity=1, **kwargs):
  ticks = itertools.count()
  return program_logic.train_model(
      train_process=process, initial_state=0, total_rounds=total,
      client_selection=lambda r: [f"a@{r}", f"b@{r}"],
      round_metrics=lambda result: {"train_loss": result.metrics["loss"]},
      evaluation=evaluation, evaluation_periodicity=periodicity,
      program_state_manager=states, metrics_release_manager=releases,
      columns=("train_loss", "test_dice", "seconds"), clock=lambda: float(next(ticks)),
      **kwargs)


def _released(releases):
  return [(c.args[1], c.args[0]) for c in releases.release.call_args_list]


def test_fresh_run_evaluates_round_zero_then_trains_releases_and_saves():
  process, states, releases, evaluation = _parts()
  rounds = []
  state, last = _train(process, states, releases, evaluation,
                       on_round=lambda r, row: rounds.append(r))
  assert (state, last) == (3, 3)
  states.load_latest.assert_called_once_with(0)
  assert [c.args for c in process.next.call_args_list] == [
      (0, ["a@1", "b@1"]), (1, ["a@2", "b@2"]), (2, ["a@3", "b@3"])]
  released = _released(releases)
  assert [key for key, _ in released] == [0, 1, 2, 3]
  assert released[0][1] == {"train_loss": None, "test_dice": 0.0, "seconds": 1.0}
  assert released[1][1] == {"train_loss": 0.5, "test_dice": 0.1, "seconds": 1.0}
  assert all(list(row) == ["train_loss", "test_dice", "seconds"] for _, row in released)
  assert [c.args for c in states.save.call_args_list] == [(1, 1), (2, 2), (3, 3)]
  assert rounds == [0, 1, 2, 3]


def test_metrics_are_released_before_the_state_is_saved():
  process, states, releases, evaluation = _parts()
  order = mock.Mock()
  order.attach_mock(releases.release, "release")
  order.attach_mock(states.save, "save")
  _train(process, states, releases, evaluation, total=2)
  names = [c[0] for c in order.mock_calls]
  assert names == ["release", "release", "save", "release", "save"]


def test_evaluation_every_n_rounds_and_at_the_last():
  process, states, releases, evaluation = _parts()
  _train(process, states, releases, evaluation, total=5, periodicity=2)
  assert [c.args for c in evaluation.call_args_list] == [(0, 0), (2, 2), (4, 4), (5, 5)]
  rows = dict(_released(releases))
  assert rows[1]["test_dice"] is None and rows[3]["test_dice"] is None
  assert rows[4]["test_dice"] == pytest.approx(0.4)


def test_resume_mid_run_continues_after_the_saved_round():
  process, states, releases, evaluation = _parts(saved=(1, 1))
  resumed = []
  state, last = _train(process, states, releases, evaluation, on_resume=resumed.append)
  assert (state, last) == (3, 3) and resumed == [1]
  assert [c.args[0] for c in process.next.call_args_list] == [1, 2]
  assert [key for key, _ in _released(releases)] == [2, 3]  # no second round 0
  assert [c.args for c in states.save.call_args_list] == [(2, 2), (3, 3)]


def test_resume_before_the_first_round_starts_with_round_zero():
  # Nothing saved yet (e.g. killed during round 0 or 1): the run starts over.
  process, states, releases, evaluation = _parts(saved=(None, 0))
  _train(process, states, releases, evaluation, total=1)
  assert [key for key, _ in _released(releases)] == [0, 1]
  assert [c.args for c in evaluation.call_args_list] == [(0, 0), (1, 1)]


@pytest.mark.parametrize("saved_round", [3, 5])
def test_resume_at_or_past_the_total_runs_nothing(saved_round):
  process, states, releases, evaluation = _parts(saved=(saved_round, saved_round))
  state, last = _train(process, states, releases, evaluation, total=3)
  assert (state, last) == (saved_round, saved_round)
  process.next.assert_not_called()
  releases.release.assert_not_called()
  states.save.assert_not_called()
  evaluation.assert_not_called()


def test_zero_rounds_only_evaluates():
  process, states, releases, evaluation = _parts()
  assert _train(process, states, releases, evaluation, total=0) == (0, 0)
  process.next.assert_not_called()
  assert [key for key, _ in _released(releases)] == [0]


def test_bad_arguments():
  process, states, releases, evaluation = _parts()
  with pytest.raises(ValueError, match="evaluation_periodicity"):
    _train(process, states, releases, evaluation, periodicity=0)
  with pytest.raises(ValueError, match="total_rounds"):
    _train(process, states, releases, evaluation, total=-1)
  states.load_latest.assert_not_called()
