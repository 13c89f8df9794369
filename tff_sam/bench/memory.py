"""Section 3 of the benchmark: peak RSS of one cached round in fresh subprocesses.

`measure_memory` starts one subprocess per run (`measure_memory_run`), each running
`memory_child_main` on a JSON spec: the task's `RunConfig`, the SAM architecture, the
manifest folder and the clients. It samples the RSS of the child and all its
descendants (TFF's `worker_binary` included) while the child builds the task with
`tasks.build_task` and runs one round.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import psutil
import transformers

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam import fileio
from tff_sam import runtime
from tff_sam.bench import loops
from tff_sam.bench import machine
from tff_sam.bench import settings as bench_settings
from tff_sam.bench import workload
from tff_sam.data import cache
from tff_sam.federated.backends import execution
from tff_sam.federated.backends import local_worker
from tff_sam.federated.learning import tasks
from tff_sam.models import sam as sam_lib

# What the subprocess runs: `memory_child_main` on the spec file given as its argument.
_CHILD_CODE = ("import sys; from tff_sam.bench import memory; "
               "memory.memory_child_main(sys.argv[1])")


def _tree(pid: int) -> tuple[int, set[int]]:
  """(summed RSS in bytes, pids of its local workers) of a process and its descendants.

  (0, empty) once the process is gone.
  """
  try:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
  except psutil.Error:
    return 0, set()
  total, workers = 0, set()
  for p in procs:
    try:
      total += p.memory_info().rss
      if p.name() == local_worker.WORKER_BINARY:
        workers.add(p.pid)
    except psutil.Error:
      pass
  return total, workers


def _end_tree(child: subprocess.Popen, timeout: float = 10.0) -> None:
  """Ends a child that is still running and every process under it.

  SIGTERM first (the child reaps its local worker itself), then SIGKILL for whatever
  is left, including a local worker TFF restarted.
  """
  if child.poll() is not None:
    return
  try:
    tree = psutil.Process(child.pid).children(recursive=True)
  except psutil.Error:
    tree = []
  runtime.stop_process(child, timeout=timeout)
  for p in tree:
    try:
      p.kill()
    except psutil.Error:
      pass


def _sample(child: subprocess.Popen, *, result_path: Path, interval: float
            ) -> tuple[list[tuple[float, int]], Optional[str]]:
  """(time, RSS) samples of the child's tree until it exits, and why it failed.

  The failure is set (and sampling stops) when a local worker the child started dies
  before the child wrote its result.
  """
  samples, seen_workers = [], set()
  while child.poll() is None:
    rss, workers = _tree(child.pid)
    samples.append((time.time(), rss))
    if seen_workers - workers and not result_path.exists() and child.poll() is None:
      return samples, (f"{local_worker.WORKER_BINARY} (pid {min(seen_workers - workers)}) died "
                       "mid-round (out of memory?)")
    seen_workers |= workers
    time.sleep(interval)
  return samples, None


def measure_memory_run(spec: dict[str, Any], *, interval: float, work_dir: Path,
                       log: Callable[[str], None]) -> dict[str, Any]:
  """Runs `memory_child_main(spec)` in a fresh Python and samples its tree's RSS.

  If the child's local worker dies (out of memory) the child is ended and the run is
  reported with `failed` set; its peak is then a lower bound.

  Returns:
    The child's report plus `peak_rss_bytes` (whole run), `setup_peak_rss_bytes`
    (before the round started), `round_peak_rss_bytes` and `samples`.
  """
  work_dir.mkdir(parents=True, exist_ok=True)
  spec_path = work_dir / f"memory_{spec['name']}.json"
  result_path = work_dir / f"memory_{spec['name']}.result.json"
  result_path.unlink(missing_ok=True)
  fileio.write_json(spec_path, {**spec, "result_path": str(result_path)})
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env.setdefault("TRANSFORMERS_VERBOSITY", "error")
  with tempfile.TemporaryFile() as stderr:
    child = subprocess.Popen([sys.executable, "-c", _CHILD_CODE, str(spec_path)], env=env,
                             stdout=subprocess.DEVNULL, stderr=stderr)
    try:
      samples, failed = _sample(child, result_path=result_path, interval=interval)
    finally:
      _end_tree(child)
    stderr.seek(0)
    err = stderr.read().decode(errors="replace")
  if failed is None and (child.returncode != 0 or not result_path.exists()):
    tail = "\n".join(err.strip().splitlines()[-15:])
    raise RuntimeError(f"memory run {spec['name']} failed (exit {child.returncode}):\n{tail}")
  rss = [s for _, s in samples]
  if failed is not None:
    report = {"name": spec["name"], "clients": len(spec["clients"]),
              "participants": len(spec["participants"]), "failed": failed,
              "peak_rss_bytes": max(rss, default=0), "samples": len(samples)}
    log(f"  {spec['name']}: {failed}; peak RSS before that "
        f"{report['peak_rss_bytes'] / machine.GIB:.2f} GiB (a lower bound)")
    return report
  report = json.loads(result_path.read_text())
  start = report["round_start"]
  before = [s for t, s in samples if t < start] or [0]
  during = [s for t, s in samples if t >= start] or [0]
  report.update(peak_rss_bytes=max(rss, default=0), setup_peak_rss_bytes=max(before),
                round_peak_rss_bytes=max(during), samples=len(samples))
  log(f"  {spec['name']}: {len(spec['participants'])} of {len(spec['clients'])} clients: "
      f"peak RSS {report['peak_rss_bytes'] / machine.GIB:.2f} GiB (before the round "
      f"{report['setup_peak_rss_bytes'] / machine.GIB:.2f} GiB), round "
      f"{report['round_s']:.1f} s")
  return report


def memory_child_main(spec_path: str) -> None:
  """The memory subprocess: one cached round over the spec's clients; writes a report.

  Holds only what a cached round needs (no image encoder): the task built from the
  architecture alone (TFF's random initial weights), its state and the clients'
  datasets, streamed from the record files by TFF. The report is written before its
  local worker is ended.
  """
  spec = json.loads(Path(spec_path).read_text())
  t0 = time.time()
  with runtime.child_processes_reaped():
    execution.configure_tff_execution(
        execution=spec.get("execution", config_lib.CPP_EXECUTION),
        max_concurrent_computation_calls=spec["max_concurrent_computation_calls"],
        num_subrounds=spec.get("num_subrounds", 1))
    task = tasks.build_task(
        config=config_lib.RunConfig.from_dict(spec["run_config"]),
        sam_config=transformers.SamConfig.from_dict(spec["sam_config"]),
        client_ids=spec["clients"], manifest_dir=Path(spec["manifest_dir"]),
        loop_implementation=spec["loop_implementation"])
    loop = loops.TffLoop(task.training_process, task.initial_state, spec["participants"])
    round_start = time.time()
    seconds = loop.step(1)
    fileio.write_json(spec["result_path"], {
        "name": spec["name"], "clients": len(spec["clients"]),
        "participants": len(spec["participants"]), "setup_s": round_start - t0,
        "round_s": seconds, "round_start": round_start, "examples": loop.examples[-1]})


def _ratios(runs: dict[str, dict[str, Any]], config: bench_settings.BenchConfig,
            subrounds: int) -> dict[str, Any]:
  small_peak = runs["small"]["peak_rss_bytes"]
  return {
      "runs": runs,
      # A failed (out-of-memory) run's peak is a lower bound, and so is its ratio.
      "ratio_is_lower_bound": "failed" in runs["large"],
      "ratio": runs["large"]["peak_rss_bytes"] / small_peak,
      "ratio_sampled": runs["large_sampled"]["peak_rss_bytes"] / small_peak,
      "ratio_subrounds": runs["large_subrounds"]["peak_rss_bytes"] / small_peak,
      "subrounds": subrounds,
      "clients": config.memory_clients, "base_clients": config.memory_base_clients,
      "examples_per_client": config.examples_per_client,
      "records_shared_on_disk": True,
      "mode": "cached, one round; every client participates (large_sampled: "
              f"{config.memory_base_clients} of {config.memory_clients} sampled; "
              f"large_subrounds: all, in {subrounds} subrounds)",
      "subrounds_ratio_is_lower_bound": "failed" in runs["large_subrounds"],
  }


def measure_memory(*, bundle: sam_lib.SamBundle, records: Sequence[cache.Record],
                   config: bench_settings.BenchConfig, work_dir: Path,
                   log: Callable[[str], None]) -> dict[str, Any]:
  """Peak RSS of a cached round: `memory_clients` vs `memory_base_clients` clients.

  Every client lists `examples_per_client` of the benchmark's cached records (the
  record files are shared on disk, so the clients' data is the same size and
  nothing is copied). Four fresh subprocesses under the first of `config.executions`
  (then `small` and `large` again under each of the others, in `executions`):
  small (all participate), large (all
  participate), the large population with `memory_base_clients` sampled, and the
  large one in subrounds of `memory_base_clients`.

  Raises:
    errors.UserError: The small run's local worker died (out of memory).
  """
  manifest_dir = work_dir / "memory_manifests"
  clients = workload.write_client_manifests(manifest_dir, records, clients=config.memory_clients,
                                            per_client=config.examples_per_client, prefix="m")
  base = {"run_config": workload.task_config(config, work_dir).to_dict(),
          "sam_config": bundle.config.to_dict(), "manifest_dir": str(manifest_dir.resolve()),
          "loop_implementation": workload.client_loop(config.loop_implementation),
          "max_concurrent_computation_calls": config.max_concurrent_computation_calls}
  rng = np.random.default_rng(config.seed)
  sampled = sorted(rng.choice(clients, size=config.memory_base_clients, replace=False).tolist())
  small = clients[:config.memory_base_clients]
  runs = {}
  subrounds = -(-config.memory_clients // config.memory_base_clients)
  for name, population, participants, num_subrounds in (
      ("small", small, small, 1), ("large", clients, clients, 1),
      ("large_sampled", clients, sampled, 1), ("large_subrounds", clients, clients, subrounds)):
    runs[name] = measure_memory_run(
        {**base, "name": name, "clients": population, "participants": participants,
         "num_subrounds": num_subrounds},
        interval=config.memory_interval, work_dir=work_dir / "memory", log=log)
  if "failed" in runs["small"]:
    raise errors.UserError(f"memory run with {config.memory_base_clients} clients: "
                           f"{runs['small']['failed']}")
  out = _ratios(runs, config, subrounds)
  out["execution"] = config.executions[0]
  out["executions"] = {}
  for name in config.executions[1:]:  # The same small and large runs under the others.
    pair = {}
    for size, population in (("small", small), ("large", clients)):
      pair[size] = measure_memory_run(
          {**base, "name": f"{size}_{name}", "clients": population, "participants": population,
           "num_subrounds": 1, "execution": name},
          interval=config.memory_interval, work_dir=work_dir / "memory", log=log)
    out["executions"][name] = {
        "runs": pair, "ratio": pair["large"]["peak_rss_bytes"] / pair["small"]["peak_rss_bytes"],
        "ratio_is_lower_bound": "failed" in pair["large"]}
  return out
