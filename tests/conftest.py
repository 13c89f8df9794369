"""Shared test set-up: the tiny model, an isolated cache, and ending TFF's C++ worker
when the session ends."""

import pytest

from tff_sam import runtime
from tff_sam.federated import execution
from tff_sam.models import build


@pytest.fixture(name="bundle", scope="session")
def _tiny_bundle():
  """The random-init tiny SAM (deterministic, so one instance serves every test)."""
  return build.load_sam("tiny")


@pytest.fixture(name="isolated_cache")
def _isolated_cache(monkeypatch, tmp_path):
  """Points the cache (`$TFF_SAM_CACHE`) at a temporary folder for one test."""
  monkeypatch.setenv("TFF_SAM_CACHE", str(tmp_path / "tff_sam_cache"))
  return tmp_path / "tff_sam_cache"


@pytest.fixture(scope="session", autouse=True)
def _end_tff_workers_after_session():
  """Ends the `worker_binary` children this pytest process started, once, at the end.

  Killing the worker mid-session would leave TFF's current execution context unusable
  for later tests (ProcessLookupError), so it happens only after the last test.
  """
  yield
  execution.end_workers()
  runtime.terminate_children()
