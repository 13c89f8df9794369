"""Shared test set-up: keep the cache out of ~/.cache unless a test opts in, and end
TFF's C++ worker when the session ends."""

import contextlib

import pytest


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
