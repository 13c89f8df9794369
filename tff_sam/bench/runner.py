"""The benchmark behind `python -m tff_sam.experiments.bench` (no flags here).

`run_benchmark(config)` measures, side by side in one run, on synthetic images written
into a fresh work folder (so every embedding is really computed):

1. **Cache speed-up**: wall time of one federated round, online (`--noembedding_cache`:
   the TFF model runs the frozen image encoder at every step) vs cached (the model
   reads precomputed embeddings), same clients, same data, same prompts, same local
   steps and batch size. The embedding precompute is timed separately (end to end,
   and the encoder alone in steady state).
2. **TFF overhead**: the same client work as a plain `tf.function` training loop in
   this process (same model class, loss, metric, Adam, datasets; one client after
   another, each starting from the global weights; example-weighted mean of the
   deltas) vs the TFF round.
3. **Memory**: peak RSS (the process plus all its descendants, TFF's `worker_binary`
   included) of a fresh subprocess running one cached round in which every client
   participates, `memory_clients` vs `memory_base_clients` clients with the same
   per-client data (the clients' manifests share the record files on disk); also the
   `memory_clients` population with `memory_base_clients` sampled, and all
   `memory_clients` in subrounds of `memory_base_clients` (`--clients_per_subround`).
4. **Communication**: bytes broadcast to and uploaded from each client per round,
   from the type signatures of the broadcast and aggregation intrinsics inside the
   processes' `next` computation: cached (decoder-only), LoRA + decoder
   (`--adapter=lora --lora_rank=config.lora_rank`), online (encoder broadcast too) and
   full-model fine-tuning (every weight both ways, derived from the parameter counts).
5. **Throughput**: decoder training examples/s from cached embeddings and embedding
   precompute images/s, for `arch` and for MobileSAM when its weights are present.
6. **Executions** (`--execution=cpp,tf`): every section above runs under the first
   execution; the cached round is also timed under each of the others (the online
   round too when TensorFlow sees a GPU), interleaved with the rest on the same
   clients and state, and the 64 vs 4 clients memory runs are repeated under them.
7. **Workers** (only with `--workers=host:port,...`): the cached round on the first
   worker alone vs on all of them (TFF's mergeable context over remote workers, the
   clients split into one sub-round per worker), interleaved with the rest; per
   worker its CPU seconds (when it runs on this machine) and busy seconds, the
   seconds two or more computed at once, and the bytes per round between this
   process and the workers (`communication.worker_bytes_per_round`).
8. **LoRA feature cache**: one LoRA training step from pixel values vs from the
   cached features where the first adapted stage starts (`adapters`), for `arch` and
   MobileSAM.

`config.sections` chooses what runs: `rounds` (sections 1, 2, 5, 6 and 7), `memory`
(3), `bytes` (4) and `adapters` (8); section 6 reports what ran of them.

Wall times exclude the first (tracing) round of every loop and average
`config.rounds` timed rounds, interleaved round by round across the loops. Every TFF
process is built by `tff_sam.federated.learning.tasks.build_task`, as the training program
builds it (robust aggregation on), from the `RunConfig` of `workload.task_config`;
`config.loop_implementation` can swap their client training loop
(`tff.learning.LoopImplementation`), and the cached round is also timed with the other
loop (`workload.compared_loop`) for comparison.

The sections live in this package's modules: `settings` (the config), `machine` (the
machine and the model), `workload` (data, precompute, manifests, the task's settings),
`loops` (the timed loops), `memory` (3), `communication` (4), `adapters` (8) and
`report` (goals and the table); this module runs them in order.

The caller installs TFF's execution context first
(`tff_sam.federated.backends.execution.configure_tff_execution`). If the local worker
dies (the kernel's out-of-memory killer), TFF would restart it and retry forever;
`failures.user_errors` ends the run with an error instead, as it does for a lost or
failed remote worker and for running out of device memory.
"""

import dataclasses
import gc
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam import fileio
from tff_sam import output_folder
from tff_sam.bench import adapters as adapters_lib
from tff_sam.bench import communication
from tff_sam.bench import loops as loops_lib
from tff_sam.bench import machine
from tff_sam.bench import memory as memory_lib
from tff_sam.bench import report
from tff_sam.bench import settings as bench_settings
from tff_sam.bench import workload
from tff_sam.data import cache
from tff_sam.data import discovery
from tff_sam.federated.backends import execution
from tff_sam.federated.backends import failures
from tff_sam.federated.backends import local_worker
from tff_sam.federated.backends import remote_workers
from tff_sam.federated.backends import tf_execution
from tff_sam.federated.learning import tasks
from tff_sam.models import adapted
from tff_sam.models import build
from tff_sam.models import sam as sam_lib

BENCH_JSON = "bench.json"

Loop = Union[loops_lib.TffLoop, loops_lib.PlainLoop]


@dataclasses.dataclass
class _Run:
  """What every section of one benchmark run shares.

  Attributes:
    config: The settings.
    work: The work folder (images, records, manifests).
    progress: `progress["section"]` names the current section (for a dead worker).
    log: Where progress lines go.
    cache_dir: Cache root holding converted MobileSAM weights, or None (default).
    timings: The raw timings, filled section by section.
  """

  config: bench_settings.BenchConfig
  work: Path
  progress: dict[str, str]
  log: Callable[[str], None]
  cache_dir: Optional[Path] = None
  timings: dict[str, Any] = dataclasses.field(default_factory=dict)
  worker_bytes: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)

  def section(self, name: str) -> None:
    self.progress["section"] = name


def run_benchmark(config: bench_settings.BenchConfig, *, log: Callable[[str], None] = print
                  ) -> dict[str, Any]:
  """Runs every section, prints progress, writes `output_dir/bench.json`.

  Args:
    config: The settings (validated here).
    log: Where progress lines go.

  Returns:
    The result (also written to `bench.json`).

  Raises:
    errors.UserError: A bad setting, `arch=mobile_sam` without its weights, a
      backend failure (`failures.user_errors`: the local worker killed, out of
      memory; a remote worker lost or failed; out of device memory), or `output_dir`
      cannot be written or another command holds it.
  """
  config.validate()
  with output_folder.claim(config.output_dir) as out:
    return _run_benchmark(config, out=out, log=log)


def _run_benchmark(config: bench_settings.BenchConfig, *, out: Path,
                   log: Callable[[str], None]) -> dict[str, Any]:
  """`run_benchmark` in its claimed folder `out`."""
  start = time.perf_counter()
  work = out / "work"
  shutil.rmtree(work, ignore_errors=True)
  info = machine.machine_info()
  log(f"machine: {info['cpu']}, {info['cores']} cores, "
      f"{(info['ram_bytes'] or 0) / machine.GIB:.1f} GiB RAM")
  run = _Run(config=config, work=work, progress={"section": "setup"}, log=log,
             cache_dir=Path(config.cache_dir).expanduser() if config.cache_dir else None)
  try:
    with failures.user_errors(run.progress, resumable=False):
      result = _run_sections(run, info)
  finally:
    if not config.keep_work:
      shutil.rmtree(work, ignore_errors=True)
  result["timings"]["total_s"] = time.perf_counter() - start
  fileio.write_json(out / BENCH_JSON, result)
  log("")
  log(report.format_table(result))
  log(f"\nwritten: {out / BENCH_JSON}")
  return result


def _loop_name(base: str, execution_name: str, config: bench_settings.BenchConfig) -> str:
  """The timed loop `base` under `execution_name` (`base` itself for the first one)."""
  return base if execution_name == config.executions[0] else f"{base}, {execution_name} execution"


def _executions_result(run: _Run, rounds: Optional[dict[str, dict[str, Any]]],
                       memory: Optional[dict[str, Any]]) -> dict[str, Any]:
  """Section 6: each execution's cached round and decoder images/s (with `rounds`) and
  its memory ratio (with `memory`)."""
  out = {}
  for i, name in enumerate(run.config.executions):
    row = {}
    if rounds is not None:
      cached = rounds[_loop_name("cached TFF", name, run.config)]
      online = rounds.get(_loop_name("online TFF", name, run.config))
      row.update(cached_round_s=cached["mean_s"],
                 decoder_examples_per_s=cached["examples_per_round"] / cached["mean_s"],
                 online_round_s=None if online is None else online["mean_s"])
    if memory is not None:
      row["memory_ratio_64_vs_4"] = (memory["ratio"] if i == 0
                                     else memory["executions"][name]["ratio"])
    out[name] = row
  return out


def _workers_loop_name(n: int) -> str:
  return f"cached TFF, {n} worker{'s' if n > 1 else ''}"


def _workers_result(run: _Run, loops: dict[str, Loop], rounds: dict[str, dict[str, Any]]
                    ) -> Optional[dict[str, Any]]:
  """Section 7: the cached round on 1 worker vs on all `--workers`, or None without."""
  if not run.config.workers:
    return None
  out = {"workers": list(run.config.workers), "runs": {}}
  for n, bytes_per_round in sorted(run.worker_bytes.items()):
    name = _workers_loop_name(n)
    timed = loops[name].rounds[1:]  # Without the warm-up (tracing) round.
    addresses = list(run.config.workers[:n])
    cpu = {a: [r["cpu_s"][a] for r in timed] for a in addresses}
    # The median: TFF compiles a computation (in this process) the first time each
    # worker's context runs it, and `merge` runs on whichever worker finishes last, so
    # a timed round can still carry a one-off compilation (seen: 4.2 s next to 0.96 s,
    # that worker busy 4.2 s on 1.0 CPU second).
    out["runs"][str(n)] = {
        "round_s": float(np.median(rounds[name]["round_s"])),
        "mean_round_s": rounds[name]["mean_s"],
        "rounds": timed,
        "cpu_s": {a: None if None in v else float(np.mean(v)) for a, v in cpu.items()},
        "busy_s": {a: float(np.mean([r["busy_s"][a] for r in timed])) for a in addresses},
        "overlap_s": float(np.mean([r["overlap_s"] for r in timed])),
        "bytes_per_round": bytes_per_round}
  runs = out["runs"]
  if len(runs) == 2:
    one, many = runs["1"], runs[str(len(run.config.workers))]
    out["speedup"] = one["round_s"] / many["round_s"]
  return out


def _communication_section(run: _Run, bundle: sam_lib.SamBundle, params: dict[str, int], *,
                           cached, online, clients: list[str]) -> dict[str, Any]:
  """Section 4 from the cached and online (or None) processes, a LoRA + decoder one and
  the compressed ones (`--update_compression`)."""
  config = run.config
  rank = config.lora_rank
  lora_config = dataclasses.replace(workload.task_config(config, run.work),
                                    adapter=config_lib.LORA_ADAPTER, lora_rank=rank,
                                    lora_alpha=float(rank))
  lora = tasks.build_task(config=lora_config, bundle=bundle, client_ids=clients,
                          manifest_dir=run.work / "manifests",
                          site_weights=adapted.write_site_weights(bundle,
                                                                  cache_root=run.work / "cache"),
                          loop_implementation=workload.client_loop(config.loop_implementation))
  compressed = {}
  for name in config_lib.QUANTIZATION_BITS:
    task = tasks.build_task(
        config=dataclasses.replace(workload.task_config(config, run.work),
                                   update_compression=name),
        bundle=bundle, client_ids=clients, manifest_dir=run.work / "manifests",
        loop_implementation=workload.client_loop(config.loop_implementation))
    compressed[name] = communication.communication(task.training_process, encoded_update=True)
  comm = communication.bytes_per_client_round(
      cached=communication.communication(cached),
      online=communication.communication(online) if online is not None else None,
      parameters=params,
      lora=communication.communication(lora.training_process),
      lora_note=f"rank {rank} on {','.join(lora_config.lora_targets)}",
      compressed=compressed)
  if comm["cached"]["upload_update"] != 4 * params["trainable"]:
    raise RuntimeError("the update type does not match the trainable weights")
  return comm


def _adapter_section(run: _Run, bundle: sam_lib.SamBundle) -> dict[str, Any]:
  """Section 8: a LoRA step from pixels vs from cached features, `arch` and MobileSAM."""
  config = run.config
  run.section("the LoRA feature-cache section")
  run.log("[8] LoRA feature cache: a training step from pixels vs from cached features")
  step = dict(cache_root=run.work / "cache", lora_rank=config.lora_rank,
              batch_size=config.batch_size, prompts_per_image=config.prompts_per_image,
              steps=config.rounds, log=run.log)
  out = {config.arch: adapters_lib.adapter_step_times(bundle, **step)}
  if config.arch != config_lib.MOBILE_SAM_MODEL:
    if not config.mobile_sam:
      out[config_lib.MOBILE_SAM_MODEL] = {"skipped": "--nomobile_sam"}
    else:
      try:
        mobile = build.load_sam(config_lib.MOBILE_SAM_MODEL, cache_dir=run.cache_dir)
      except errors.UserError as e:
        out[config_lib.MOBILE_SAM_MODEL] = {"skipped": str(e)}
      else:
        out[config_lib.MOBILE_SAM_MODEL] = adapters_lib.adapter_step_times(mobile, **step)
  return out


def _bytes_alone(run: _Run, bundle: sam_lib.SamBundle, params: dict[str, int]
                 ) -> dict[str, Any]:
  """Section 4 without the rounds: builds the cached process (no online one: the
  decoder-only, LoRA and full-model rows need none)."""
  config = run.config
  run.section("building the processes")
  clients = [f"client_{i}" for i in range(config.clients)]
  cached = tasks.build_task(config=workload.task_config(config, run.work), bundle=bundle,
                            client_ids=clients, manifest_dir=run.work / "manifests")
  return _communication_section(run, bundle, params, cached=cached.training_process,
                                online=None, clients=clients)


def _run_sections(run: _Run, info: dict[str, Any]) -> dict[str, Any]:
  """The sections of `run_benchmark` that `config.sections` names, in order; returns
  the result."""
  config = run.config
  sections = set(config.sections)
  bundle, params = _load_model(run)
  result = {"timings": run.timings, "machine": info, "config": config.to_dict(),
            "model": {"name": bundle.name, "parameters": params}}
  if sections & {bench_settings.ROUNDS_SECTION, bench_settings.MEMORY_SECTION}:
    examples, records, image_records, pre = _precompute_section(run, bundle)
  rounds = memory = None
  if bench_settings.ROUNDS_SECTION in sections:
    rounds = _timed_sections(run, bundle, params, records, image_records, result)
    result.update(_rounds_result(run, rounds, pre))
    result["throughput"] = _throughput_section(run, bundle, examples, pre, rounds)
  elif bench_settings.BYTES_SECTION in sections:
    result["bytes_per_client_round"] = _bytes_alone(run, bundle, params)
  if bench_settings.MEMORY_SECTION in sections:
    memory = _memory_section(run, bundle, records)
    result.update(memory=memory, memory_ratio_64_vs_4=memory["ratio"],
                  memory_ratio_64_vs_4_subrounds=memory["ratio_subrounds"])
  if rounds is not None or memory is not None:
    _add_executions(run, result, rounds, memory)
  if "bytes_per_client_round" in result:
    comm = result["bytes_per_client_round"]
    result.update(lora_bytes_ratio=comm["lora"]["total"] / comm["cached"]["total"],
                  int8_upload_mb=comm["int8"]["upload_update"] / 1e6)
  if bench_settings.ADAPTERS_SECTION in sections:
    result["adapter_cache"] = _adapter_section(run, bundle)
  result["goals"] = report.goal_verdicts(result, config)
  return result


def _timed_sections(run: _Run, bundle: sam_lib.SamBundle, params: dict[str, int],
                    records: Sequence[cache.Record], image_records: Sequence[cache.Record],
                    result: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """Builds the loops, sizes their bytes (section 4, when asked for) into `result`,
  times the rounds and the workers (section 7); returns the rounds' timings."""
  loops, processes, clients = _process_section(run, bundle, records, image_records)
  if bench_settings.BYTES_SECTION in run.config.sections:
    result["bytes_per_client_round"] = _communication_section(
        run, bundle, params, cached=processes["cached"], online=processes["online"],
        clients=clients)
  del processes
  rounds = _rounds_section(run, loops)
  result["workers"] = _workers_result(run, loops, rounds)
  # The other executions' local workers end here, on purpose (under the watch), before
  # their contexts go: TFF's finalizers would end them too, and look like a crash.
  local_worker.end_local_workers()
  del loops
  gc.collect()
  return rounds


def _rounds_result(run: _Run, rounds: dict[str, dict[str, Any]], pre: dict[str, float]
                   ) -> dict[str, Any]:
  """Sections 1 and 2 read off the timed rounds: cache speed-up and TFF overhead."""
  config = run.config
  cached, online, plain = rounds["cached TFF"], rounds["online TFF"], rounds["plain tf.function"]
  other = workload.compared_loop(config.loop_implementation)
  compared = rounds[f"cached TFF, {other}"]
  saved = online["mean_s"] - cached["mean_s"]
  return {
      "cache_speedup": online["mean_s"] / cached["mean_s"],
      "tff_overhead": cached["mean_s"] / plain["mean_s"],
      "cache": {"online_round_s": online["mean_s"], "cached_round_s": cached["mean_s"],
                "precompute_s": pre["precompute_s"],
                "break_even_rounds": pre["precompute_s"] / saved if saved > 0 else None},
      "overhead": {
          "tff_round_s": cached["mean_s"], "plain_round_s": plain["mean_s"],
          "loop_implementation": config.loop_implementation,
          "compared": {"loop_implementation": other, "tff_round_s": compared["mean_s"],
                       "tff_overhead": compared["mean_s"] / plain["mean_s"]}},
  }


def _add_executions(run: _Run, result: dict[str, Any],
                    rounds: Optional[dict[str, dict[str, Any]]],
                    memory: Optional[dict[str, Any]]) -> None:
  """Section 6 into `result`: per execution, and tf against cpp when both ran."""
  executions = _executions_result(run, rounds, memory)
  result["executions"] = executions
  tf_row = executions.get(config_lib.TF_EXECUTION, {})
  result["memory_ratio_64_vs_4_tf"] = tf_row.get("memory_ratio_64_vs_4")
  result["tf_vs_cpp_round_time"] = None
  if rounds is not None and config_lib.CPP_EXECUTION in executions and tf_row:
    result["tf_vs_cpp_round_time"] = (
        tf_row["cached_round_s"] / executions[config_lib.CPP_EXECUTION]["cached_round_s"])


def _load_model(run: _Run) -> tuple[sam_lib.SamBundle, dict[str, int]]:
  """Loads the benchmark's architecture; returns it and its parameter counts."""
  config = run.config
  t0 = time.perf_counter()
  bundle = machine.load_bench_bundle(config.arch, cache_dir=run.cache_dir)
  run.timings["load_model_s"] = time.perf_counter() - t0
  params = machine.parameter_counts(bundle)
  if config.arch == bench_settings.VIT_B_ARCH and params["total"] != machine.VIT_B_PARAMETERS:
    raise RuntimeError(f"ViT-B has {params['total']} weights, expected "
                       f"{machine.VIT_B_PARAMETERS}")
  run.log(f"model: {bundle.name}: {params['total'] / 1e6:.2f} M parameters (image encoder "
          f"{params['image_encoder'] / 1e6:.2f} M, prompt encoder + decoder "
          f"{params['prompt_decoder'] / 1e6:.3f} M, trainable {params['trainable'] / 1e6:.3f} M)")
  return bundle, params


def _precompute_section(run: _Run, bundle: sam_lib.SamBundle
                        ) -> tuple[list[discovery.Example], list[cache.Record],
                                   list[cache.Record], dict[str, float]]:
  """Writes the images; the embedding precompute (timed) and the online records.

  Returns:
    The examples, their cached records, their online (image) records and the
    precompute's timings.
  """
  config = run.config
  n = config.clients * config.examples_per_client
  examples = workload.write_examples(run.work / "data", count=n, size=config.image_size,
                                     seed=config.seed)
  run.section("the embedding precompute")
  run.log(f"[1/5] embedding precompute: {n} images ({config.clients} clients x "
          f"{config.examples_per_client})")
  records, pre = workload.precompute(bundle, examples, cache_root=run.work / "cache",
                                     batch_size=config.encode_batch_size)
  run.log(f"  {pre['precompute_s']:.1f} s end to end ({pre['precompute_images_per_s']:.3f} "
          f"images/s); encoder alone {pre['encoder_s_per_image']:.3f} s/image")
  t0 = time.perf_counter()
  image_records, _ = cache.build_records(
      examples, bundle=bundle, cache_root=run.work / "cache", binary_components=False,
      batch_size=config.encode_batch_size, show_progress=False, online=True)
  run.timings["online_records_s"] = time.perf_counter() - t0
  run.timings["precompute"] = pre
  return examples, records, image_records, pre


def _process_section(run: _Run, bundle: sam_lib.SamBundle, records: Sequence[cache.Record],
                     image_records: Sequence[cache.Record]
                     ) -> tuple[dict[str, Loop], dict[str, Any], list[str]]:
  """Builds the loops (`tasks.build_task`, as the program does).

  Returns:
    The loops to time (cached TFF, plain `tf.function`, cached TFF with the compared
    client loop, online TFF, and under the other executions and on the workers), the
    cached and online training processes (for section 4) and the client ids.
  """
  config = run.config
  run.section("building the processes")
  per_client = dict(clients=config.clients, per_client=config.examples_per_client)
  clients = workload.write_client_manifests(run.work / "manifests", records, **per_client)
  if workload.write_client_manifests(run.work / "online_manifests", image_records,
                                     **per_client) != clients:
    raise RuntimeError("online and cached clients differ")
  cached_config = workload.task_config(config, run.work)
  build_cached = dict(config=cached_config, bundle=bundle, client_ids=clients,
                      manifest_dir=run.work / "manifests")
  t0 = time.perf_counter()
  cached = tasks.build_task(**build_cached,
                            loop_implementation=workload.client_loop(config.loop_implementation))
  loops = {"cached TFF": loops_lib.TffLoop(cached.training_process, cached.initial_state,
                                           clients)}
  others = {e: execution.build_context(e) for e in config.executions[1:]}
  for name, context in others.items():
    loops[_loop_name("cached TFF", name, config)] = loops_lib.TffLoop(
        cached.training_process, cached.initial_state, clients, context=context)
  for n in sorted({1, len(config.workers)}) if config.workers else ():
    contexts = remote_workers.build_remote_contexts(
        config.workers[:n], compiler_fn=execution.compile_for_cpp_worker)
    loops[_workers_loop_name(n)] = loops_lib.WorkersLoop(
        cached.training_process, cached.initial_state, clients,
        context=execution.mergeable_over(contexts), worker_contexts=contexts)
    run.worker_bytes[n] = communication.worker_bytes_per_round(cached.training_process,
                                                               num_subrounds=n)
  run.timings["build_cached_process_s"] = time.perf_counter() - t0
  loops["plain tf.function"] = loops_lib.PlainLoop(
      bundle=bundle, spec=cached.pipeline_spec, clients=clients, config=cached_config)
  other = workload.compared_loop(config.loop_implementation)
  compared = tasks.build_task(**build_cached, loop_implementation=other)
  loops[f"cached TFF, {other}"] = loops_lib.TffLoop(compared.training_process,
                                                    compared.initial_state, clients)
  del compared
  t0 = time.perf_counter()
  online = tasks.build_task(
      config=workload.task_config(config, run.work, online=True), bundle=bundle,
      client_ids=clients, manifest_dir=run.work / "online_manifests",
      loop_implementation=workload.client_loop(config.loop_implementation))
  online_process = online.training_process
  loops["online TFF"] = loops_lib.TffLoop(online_process, online.initial_state, clients)
  if tf_execution.visible_gpus():  # On the CPU an online round costs minutes.
    for name, context in others.items():
      loops[_loop_name("online TFF", name, config)] = loops_lib.TffLoop(
          online_process, online.initial_state, clients, context=context)
  del online  # Its Keras model holds a copy of the image encoder.
  gc.collect()
  run.timings["build_online_process_s"] = time.perf_counter() - t0
  run.log(f"  processes built: cached {run.timings['build_cached_process_s']:.1f} s, online "
          f"{run.timings['build_online_process_s']:.1f} s (client loop: "
          f"{config.loop_implementation})")
  return loops, {"cached": cached.training_process, "online": online_process}, clients


def _rounds_section(run: _Run, loops: dict[str, Loop]) -> dict[str, dict[str, Any]]:
  """Sections 1 and 2: the loops' rounds, interleaved; returns their timings."""
  config = run.config
  run.section("the federated rounds (the online round is the largest)")
  run.log(f"[1-2/5] federated rounds: {config.clients} clients x "
          f"{config.examples_per_client} images, batch {config.batch_size}, "
          f"{config.prompts_per_image} prompts/image; 1 warm-up + {config.rounds} timed "
          "rounds each, interleaved")
  rounds = loops_lib.time_loops(loops, config.rounds, run.log)
  if len({r["examples_per_round"] for r in rounds.values()}) != 1:
    raise RuntimeError(f"the loops trained on different numbers of examples: "
                       f"{ {k: r['examples_per_round'] for k, r in rounds.items()} }")
  run.timings["rounds"] = rounds
  return rounds


def _memory_section(run: _Run, bundle: sam_lib.SamBundle, records: Sequence[cache.Record]
                    ) -> dict[str, Any]:
  """Section 3: peak RSS of fresh subprocesses (`memory.measure_memory`)."""
  config = run.config
  run.section("the memory runs")
  run.log(f"[3/5] memory: fresh subprocesses, one cached round, {config.memory_clients} vs "
          f"{config.memory_base_clients} clients x {config.examples_per_client} images")
  memory = memory_lib.measure_memory(bundle=bundle, records=records, config=config,
                                     work_dir=run.work, log=run.log)
  run.timings["memory"] = {k: {"setup_s": v.get("setup_s"), "round_s": v.get("round_s")}
                           for k, v in memory["runs"].items()}
  return memory


def _throughput_section(run: _Run, bundle: sam_lib.SamBundle,
                        examples: Sequence[discovery.Example], pre: dict[str, float],
                        rounds: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Section 5: throughput of `arch` (from the timed rounds), and of MobileSAM."""
  config = run.config
  run.section("the throughput section")
  cached, online, plain = rounds["cached TFF"], rounds["online TFF"], rounds["plain tf.function"]
  examples_per_round = cached["examples_per_round"]
  throughput = {config.arch: {
      "model": bundle.name,
      "decoder_examples_per_s": examples_per_round / cached["mean_s"],
      "decoder_prompts_per_s": examples_per_round * config.prompts_per_image / cached["mean_s"],
      "decoder_examples_per_s_plain": examples_per_round / plain["mean_s"],
      "online_examples_per_s": examples_per_round / online["mean_s"],
      "precompute_images_per_s": pre["precompute_images_per_s"],
      "encoder_images_per_s": pre["encoder_images_per_s"],
  }}
  if config.arch == config_lib.MOBILE_SAM_MODEL:
    return throughput
  if not config.mobile_sam:
    throughput[config_lib.MOBILE_SAM_MODEL] = {"skipped": "--nomobile_sam"}
    return throughput
  run.log("[5/5] throughput: mobile_sam")
  mobile = _mobile_sam_throughput(run, examples)
  if "cached_round" in mobile:
    run.timings["mobile_sam"] = {"precompute": mobile.pop("precompute"),
                                 "cached_round": mobile.pop("cached_round")}
  throughput[config_lib.MOBILE_SAM_MODEL] = mobile
  return throughput


def _mobile_sam_throughput(run: _Run, examples: Sequence[discovery.Example]
                           ) -> dict[str, Any]:
  """Precompute and cached-round throughput of MobileSAM, or why it was skipped."""
  config = run.config
  try:
    bundle = build.load_sam(config_lib.MOBILE_SAM_MODEL, cache_dir=run.cache_dir)
  except errors.UserError as e:
    run.log(f"  mobile_sam: skipped ({e})")
    return {"skipped": str(e)}
  records, pre = workload.precompute(bundle, examples, cache_root=run.work / "cache",
                                     batch_size=config.encode_batch_size)
  run.log(f"  mobile_sam precompute: {pre['images']} images in {pre['precompute_s']:.1f} s; "
          f"encoder {pre['encoder_s_per_image']:.3f} s/image")
  manifest_dir = run.work / "mobile_sam_manifests"
  clients = workload.write_client_manifests(manifest_dir, records, clients=config.clients,
                                            per_client=config.examples_per_client)
  task = tasks.build_task(config=workload.task_config(config, run.work), bundle=bundle,
                          client_ids=clients, manifest_dir=manifest_dir,
                          loop_implementation=workload.client_loop(config.loop_implementation))
  name = "mobile_sam cached TFF"
  loops = {name: loops_lib.TffLoop(task.training_process, task.initial_state, clients)}
  for other in config.executions[1:]:  # Section 6 at the real decoder's size.
    loops[_loop_name(name, other, config)] = loops_lib.TffLoop(
        task.training_process, task.initial_state, clients,
        context=execution.build_context(other))
  times = loops_lib.time_loops(loops, config.rounds, run.log)
  local_worker.end_local_workers()  # On purpose, under the watch (see `_run_sections`).
  timed = times[name]
  examples_per_round = timed["examples_per_round"]
  executions = {e: times[_loop_name(name, e, config)]["mean_s"] for e in config.executions}
  return {"model": bundle.name, "precompute": pre, "cached_round": timed,
          "cached_round_s_by_execution": executions,
          "decoder_examples_per_s": examples_per_round / timed["mean_s"],
          "decoder_prompts_per_s": examples_per_round * config.prompts_per_image / timed["mean_s"],
          "precompute_images_per_s": pre["precompute_images_per_s"],
          "encoder_images_per_s": pre["encoder_images_per_s"],
          "parameters": machine.parameter_counts(bundle)}
