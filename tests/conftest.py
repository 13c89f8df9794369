"""Shared test set-up: the tiny model, an isolated cache, the session's one tiny
reference run, running a binary in this process, and ending TFF's C++ worker when the
session ends."""

import dataclasses
import importlib
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import transformers.utils.hub
from absl import flags
from absl.testing import flagsaver

from tff_sam import config as config_lib
from tff_sam import runtime
from tff_sam.data import synthetic
from tff_sam.federated import execution
from tff_sam.federated import program
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


@pytest.fixture(name="offline")
def _offline(monkeypatch, tmp_path):
  """No network and an empty hub cache, so hub ids fail fast and deterministically."""
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(transformers.utils.hub, "_is_offline_mode", True)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
  monkeypatch.setenv("TFF_SAM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session", autouse=True)
def _end_tff_workers_after_session():
  """Ends the `worker_binary` children this pytest process started, once, at the end.

  Killing the worker mid-session would leave TFF's current execution context unusable
  for later tests (ProcessLookupError), so it happens only after the last test.
  """
  yield
  execution.end_workers()
  runtime.terminate_children()


# ---------------------------------------------------------------- the reference run

REFERENCE_ROUNDS = 4


@pytest.fixture(name="reference_data", scope="session")
def _reference_data(tmp_path_factory):
  """Synthetic data: 3 sites x 2 training images, held out in `test/<site>/` (3 clients)."""
  root = synthetic.generate(tmp_path_factory.mktemp("reference_data") / "syn",
                            images_per_site=2, test_per_site=1)
  for sub in ("images", "masks"):
    for f in sorted((root / "test" / sub).iterdir()):
      site = f"site_{f.stem[4]}"  # stems are site<k>_<i>
      (root / "test" / site / sub).mkdir(parents=True, exist_ok=True)
      f.rename(root / "test" / site / sub / f.name)
    (root / "test" / sub).rmdir()
  return root


@pytest.fixture(name="reference_cache", scope="session")
def _reference_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("reference_cache")


@pytest.fixture(name="reference_settings", scope="session")
def _reference_settings(reference_data, reference_cache) -> dict:
  """`RunConfig` fields (all but `output_dir`) of the reference run."""
  return dict(data_dir=str(reference_data), cache_dir=str(reference_cache), model="tiny",
              rounds=REFERENCE_ROUNDS, clients_per_round=2, local_epochs=1, batch_size=2,
              prompts_per_image=2, client_lr=3e-3, eval_every=1, seed=5)


@dataclasses.dataclass(frozen=True)
class ReferenceRun:
  """The session's one uninterrupted tiny run, in this process (`program.run_experiment`)."""

  config: config_lib.RunConfig
  out: Path
  summary: dict
  lines: tuple[str, ...]


@pytest.fixture(name="reference_run", scope="session")
def _reference_run(tmp_path_factory, reference_settings):
  out = tmp_path_factory.mktemp("reference_run") / "out"
  config = config_lib.RunConfig(output_dir=str(out), **reference_settings).validate()
  lines = []
  summary = program.run_experiment(config, log=lines.append)
  return ReferenceRun(config=config, out=out, summary=summary, lines=tuple(lines))


# ---------------------------------------------------------------- binaries in-process


@dataclasses.dataclass(frozen=True)
class BinaryResult:
  code: int
  stdout: str
  stderr: str

  def error_lines(self) -> list[str]:
    return [line for line in self.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(name="run_binary")
def _run_binary(capfd, monkeypatch):
  """Runs `python -m tff_sam.experiments.<name> ARGS` in this process.

  The binary's module is imported afresh inside `flagsaver`, which removes the flags
  it defined afterwards (the binaries define some of the same flag names), its
  flags are parsed from the arguments (`--flagfile` included) and its `main` runs
  (`runtime.run_job`: one `error:` line for a user mistake). Process-wide effects stay
  out of the test process: installing TFF's execution context and ending this
  process's children (the subprocess tests of each binary cover them).
  """
  monkeypatch.setattr(execution, "configure_tff_execution", lambda **_: None)
  monkeypatch.setattr(execution, "end_workers", lambda **_: 0)
  monkeypatch.setattr(runtime, "terminate_children", lambda **_: 0)

  def run(name: str, *args: str) -> BinaryResult:
    module_name = f"tff_sam.experiments.{name}"
    capfd.readouterr()
    with flagsaver.flagsaver():
      sys.modules.pop(module_name, None)
      try:
        module = importlib.import_module(module_name)
        argv = flags.FLAGS([name, *args])
        code = module.main(argv)
      finally:
        sys.modules.pop(module_name, None)
    captured = capfd.readouterr()
    return BinaryResult(code=code, stdout=captured.out, stderr=captured.err)

  return run
