"""Shared test set-up: the tiny model, an isolated cache, and ending TFF's C++ worker
when the session ends."""

import contextlib

import pytest


@pytest.fixture(name="bundle", scope="session")
def _tiny_bundle():
  """The random-init tiny SAM (deterministic, so one instance serves every test)."""
  from tff_sam import model as model_lib  # pylint: disable=g-import-not-at-top
  return model_lib.load_sam("tiny")


@pytest.fixture(name="isolated_cache")
def _isolated_cache(monkeypatch, tmp_path):
  """Points the cache (`$TFF_SAM_CACHE`) at a temporary folder for one test."""
  monkeypatch.setenv("TFF_SAM_CACHE", str(tmp_path / "tff_sam_cache"))
  return tmp_path / "tff_sam_cache"


@pytest.fixture(scope="session", autouse=True)
def _end_tff_workers_after_session():
  """Ends the `worker_binary` children this pytest process started, once, at the end.

  Killing the worker mid-session would leave TFF's current execution context unusable
  for later tests (ProcessLookupError), so it happens only after the last test, after
  installing a fresh, lazy context.
  """
  yield
  import sys  # pylint: disable=g-import-not-at-top
  if "tensorflow_federated" in sys.modules:
    tff = sys.modules["tensorflow_federated"]
    with contextlib.suppress(Exception):
      tff.backends.native.set_sync_local_cpp_execution_context()
  from tff_sam import runtime  # pylint: disable=g-import-not-at-top
  runtime.terminate_children()
