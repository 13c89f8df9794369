"""The benchmark's verdicts and its printed table.

`goal_verdicts` checks a result against `GOALS`; `format_table` is the human-readable
summary `run_benchmark` prints (one row helper per section).
"""

from typing import Any

from tff_sam import config as config_lib
from tff_sam.bench import machine
from tff_sam.bench import settings as bench_settings

# Goals of the benchmark: (key, comparison, threshold).
# `tf_vs_cpp_round_time` is the cached round under --execution=tf over cpp: at most
# 1.0 on the CPU, at most 1/20 on a GPU at ViT-B size (`..._gpu`). `lora_bytes_ratio`:
# bytes per client and round of LoRA (rank `lora_rank`) + decoder over decoder-only.
# `int8_upload_mb`: the decoder update's upload at 8 bits (SAM's decoder, 16.2 MB in
# float32), at SAM's decoder size only.
GOALS = (("cache_speedup", ">=", 20.0), ("tff_overhead", "<=", 1.05),
         ("memory_ratio_64_vs_4", "<=", 1.3), ("memory_ratio_64_vs_4_subrounds", "<=", 1.3),
         ("tf_vs_cpp_round_time", "<=", 1.0), ("tf_vs_cpp_round_time_gpu", "<=", 0.05),
         ("memory_ratio_64_vs_4_tf", "<=", 1.1), ("lora_bytes_ratio", "<=", 1.1),
         ("int8_upload_mb", "<=", 4.1))
_MB = 1e6

Row = tuple[str, str, str]


def goal_verdicts(result: dict[str, Any], config: bench_settings.BenchConfig
                  ) -> dict[str, dict[str, Any]]:
  """Each goal's value, threshold, whether it is met and whether it applies.

  The cache speed-up goal applies to ViT-B only, the memory goals to 64 vs 4 clients,
  the tf-vs-cpp goals when both executions ran (the GPU one on a GPU at ViT-B size,
  the other on the CPU). A goal without a value (its section did not run) is not met
  and does not apply.
  """
  on_gpu = bool(result["machine"].get("gpus"))
  both = result.get("tf_vs_cpp_round_time") is not None
  applicable = {
      "cache_speedup": config.arch == bench_settings.VIT_B_ARCH,
      "tff_overhead": True,
      "memory_ratio_64_vs_4": (config.memory_clients, config.memory_base_clients) == (64, 4),
      "tf_vs_cpp_round_time": both and not on_gpu,
      "tf_vs_cpp_round_time_gpu": both and on_gpu and config.arch == bench_settings.VIT_B_ARCH,
      "lora_bytes_ratio": config.lora_rank == 4,
      "int8_upload_mb": config.arch != config_lib.TINY_MODEL,
  }
  applicable["memory_ratio_64_vs_4_subrounds"] = applicable["memory_ratio_64_vs_4"]
  applicable["memory_ratio_64_vs_4_tf"] = (applicable["memory_ratio_64_vs_4"]
                                           and result.get("memory_ratio_64_vs_4_tf") is not None)
  out = {}
  for key, op, threshold in GOALS:
    value = result.get(key.removesuffix("_gpu"))  # The GPU goal reads the same value.
    if value is None:
      out[key] = {"value": None, "goal": f"{op} {threshold:g}", "threshold": threshold,
                  "met": False, "applicable": False}
      continue
    met = value >= threshold if op == ">=" else value <= threshold
    out[key] = {"value": value, "goal": f"{op} {threshold:g}", "threshold": threshold,
                "met": bool(met), "applicable": applicable[key]}
  return out


def _mb(value: float) -> str:
  return f"{value / _MB:,.2f} MB"


def _goal(goals: dict[str, dict[str, Any]], key: str) -> str:
  g = goals[key]
  verdict = "met" if g["met"] else "NOT met"
  return f"goal {g['goal']}: {verdict}" + ("" if g["applicable"] else " (n/a at these sizes)")


def _speed_rows(result: dict[str, Any]) -> list[Row]:
  """Sections 1 and 2: cache speed-up, precompute, TFF overhead, the other loop."""
  goals, cache = result["goals"], result["cache"]
  pre = result["timings"]["precompute"]
  break_even = cache["break_even_rounds"]
  ov = result["overhead"]
  other = ov["compared"]
  return [
      ("1 cache speed-up (per round)", f"{result['cache_speedup']:.1f}x  online "
       f"{cache['online_round_s']:.2f} s vs cached {cache['cached_round_s']:.3f} s",
       _goal(goals, "cache_speedup")),
      ("  embedding precompute", f"{pre['precompute_s']:.1f} s for {pre['images']} "
       f"images; encoder {pre['encoder_s_per_image']:.3f} s/image",
       "" if break_even is None else f"repaid after {break_even:.2f} rounds"),
      ("2 TFF overhead (TFF / plain)", f"{result['tff_overhead']:.2f}x  TFF "
       f"{ov['tff_round_s']:.3f} s vs tf.function {ov['plain_round_s']:.3f} s",
       _goal(goals, "tff_overhead")),
      (f"  TFF with the {other['loop_implementation']} loop",
       f"{other['tff_overhead']:.2f}x  TFF {other['tff_round_s']:.3f} s",
       f"(the run's loop: {ov['loop_implementation']})"),
  ]


def _memory_rows(result: dict[str, Any]) -> list[Row]:
  """Section 3: the large, sampled and subrounds runs against the small one."""
  goals, mem = result["goals"], result["memory"]
  runs = mem["runs"]
  gib = machine.GIB
  bound = ">= " if mem.get("ratio_is_lower_bound") else ""
  large, sub = runs["large"], runs["large_subrounds"]
  return [
      (f"3 memory {mem['clients']} vs {mem['base_clients']} clients",
       f"{bound}{mem['ratio']:.2f}x  peak RSS {large['peak_rss_bytes'] / gib:.2f}"
       f" vs {runs['small']['peak_rss_bytes'] / gib:.2f} GiB",
       _goal(goals, "memory_ratio_64_vs_4") + (f"; {large['failed']}"
                                               if "failed" in large else "")),
      (f"  {mem['base_clients']} of {mem['clients']} sampled",
       f"{mem['ratio_sampled']:.2f}x  peak RSS "
       f"{runs['large_sampled']['peak_rss_bytes'] / gib:.2f} GiB",
       runs["large_sampled"].get("failed", "")),
      (f"  all {mem['clients']} in {mem['subrounds']} subrounds",
       f"{'>= ' if 'failed' in sub else ''}{mem['ratio_subrounds']:.2f}x  peak RSS "
       f"{sub['peak_rss_bytes'] / gib:.2f} GiB",
       _goal(goals, "memory_ratio_64_vs_4_subrounds") + (f"; {sub['failed']}"
                                                         if "failed" in sub else "")),
  ]


def _communication_rows(result: dict[str, Any]) -> list[Row]:
  """Section 4: bytes down and up per client and round, per mode."""
  comm = result["bytes_per_client_round"]
  rows = []
  lora = f"LoRA r{result['config']['lora_rank']} + decoder"
  for key, label in (("cached", "cached (decoder only)"), ("lora", lora),
                     ("int8", "decoder, int8 uploads"), ("int4", "decoder, int4 uploads"),
                     ("online", "online (encoder too)"), ("full_model", "full-model fine-tuning")):
    if key not in comm:
      continue
    c = comm[key]
    goal = ""
    if key == "lora":
      goal = f"{result['lora_bytes_ratio']:.3f}x decoder-only; " + _goal(result["goals"],
                                                                          "lora_bytes_ratio")
    elif key == "int8":
      goal = (f"update {_mb(c['upload_update'])}; " + _goal(result["goals"], "int8_upload_mb"))
    rows.append((f"4 bytes/client/round, {label}" if key == "cached" else f"  {label}",
                 f"down {_mb(c['broadcast'])}, up {_mb(c['upload'])}", goal))
  return rows


def _adapter_rows(result: dict[str, Any]) -> list[Row]:
  """Section 8: a LoRA step from pixels vs from the feature cache."""
  rows = []
  for i, (arch, a) in enumerate(result.get("adapter_cache", {}).items()):
    if "skipped" in a:
      rows.append((f"8 LoRA feature cache, {arch}" if i == 0 else f"  {arch}", "skipped",
                   a["skipped"][:70]))
      continue
    rows.append((f"8 LoRA feature cache, {arch}" if i == 0 else f"  {arch}",
                 f"step {a['pixels_step_s']:.3f} s from pixels, {a['features_step_s']:.3f} s "
                 f"from features: {100 * a['saving']:.1f}% saved",
                 f"cut at {a['feature_cut']}; {_mb(a['feature_bytes_per_image'])}/image "
                 f"(embedding {_mb(a['embedding_bytes_per_image'])})"))
  return rows


def _throughput_rows(result: dict[str, Any]) -> list[Row]:
  """Section 5: decoder and precompute throughput per architecture."""
  rows = []
  for arch, t in result["throughput"].items():
    if "skipped" in t:
      rows.append((f"5 throughput, {arch}", "skipped", t["skipped"][:70]))
      continue
    rows.append((f"5 throughput, {arch}",
                 f"decoder {t['decoder_examples_per_s']:.2f} images/s "
                 f"({t['decoder_prompts_per_s']:.1f} prompts/s) in TFF",
                 f"precompute {t['precompute_images_per_s']:.3f} images/s "
                 f"(encoder alone {t['encoder_images_per_s']:.3f})"))
  return rows


def _execution_rows(result: dict[str, Any]) -> list[Row]:
  """Section 6: the cached round, decoder images/s and memory per execution."""
  goals, rows = result["goals"], []
  for i, (name, e) in enumerate(result.get("executions", {}).items()):
    timed = "not timed"
    if "cached_round_s" in e:
      online = "" if e["online_round_s"] is None else f", online {e['online_round_s']:.2f} s"
      timed = (f"cached round {e['cached_round_s']:.3f} s "
               f"({e['decoder_examples_per_s']:.2f} images/s){online}")
    memory = ("" if "memory_ratio_64_vs_4" not in e else
              f"memory {result['config']['memory_clients']} vs "
              f"{result['config']['memory_base_clients']}: {e['memory_ratio_64_vs_4']:.2f}x")
    rows.append((f"6 execution {name}" if i == 0 else f"  execution {name}", timed, memory))
  if result.get("tf_vs_cpp_round_time") is not None:
    gpu = goals["tf_vs_cpp_round_time_gpu"]["applicable"]
    key = "tf_vs_cpp_round_time_gpu" if gpu else "tf_vs_cpp_round_time"
    rows.append(("  tf / cpp cached round time", f"{result['tf_vs_cpp_round_time']:.2f}x",
                 _goal(goals, key)))
    by_execution = result.get("throughput", {}).get(config_lib.MOBILE_SAM_MODEL, {}).get(
        "cached_round_s_by_execution", {})
    if {"cpp", "tf"} <= set(by_execution):
      rows.append(("  mobile_sam cached round", f"tf {by_execution['tf']:.3f} s vs cpp "
                   f"{by_execution['cpp']:.3f} s: {by_execution['tf'] / by_execution['cpp']:.2f}x",
                   "(real decoder weights)"))
  if result.get("memory_ratio_64_vs_4_tf") is not None:
    cfg = result["config"]
    rows.append((f"  tf memory {cfg['memory_clients']} vs {cfg['memory_base_clients']} "
                 f"clients", f"{result['memory_ratio_64_vs_4_tf']:.2f}x",
                 _goal(goals, "memory_ratio_64_vs_4_tf")))
  return rows


def _worker_rows(result: dict[str, Any]) -> list[Row]:
  """Section 7: the cached round on 1 worker vs on all `--workers`."""
  workers = result.get("workers")
  if not workers:
    return []
  rows = []
  for i, (n, r) in enumerate(workers["runs"].items()):
    cpu = ", ".join(f"{a} {'n/a' if v is None else f'{v:.1f}'} s"
                    for a, v in r["cpu_s"].items())
    rows.append((f"7 workers: {n}" if i == 0 else f"  workers: {n}",
                 f"cached round {r['round_s']:.3f} s (median); {r['overlap_s']:.2f} s "
                 "with 2+ computing at once", f"CPU: {cpu}; {_mb(r['bytes_per_round']['total'])}"
                 "/round to and from the workers"))
  if "speedup" in workers:
    rows.append(("  1 worker / all workers", f"{workers['speedup']:.2f}x round time (medians)",
                 "(the workers share this machine's cores)"))
  return rows


def format_table(result: dict[str, Any]) -> str:
  """The human-readable summary of a `run_benchmark` result."""
  cfg, params = result["config"], result["model"]["parameters"]
  rows = []
  for key, row_fn in (("cache_speedup", _speed_rows), ("memory", _memory_rows),
                      ("bytes_per_client_round", _communication_rows),
                      ("throughput", _throughput_rows), ("executions", _execution_rows),
                      ("workers", _worker_rows), ("adapter_cache", _adapter_rows)):
    if result.get(key):
      rows += row_fn(result)
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  head = (f"tff_sam benchmark: {result['model']['name']}, {params['total'] / 1e6:.1f} M "
          f"parameters; {cfg['clients']} clients x {cfg['examples_per_client']} images, "
          f"batch {cfg['batch_size']}, mean of {cfg['rounds']} timed rounds; client loop "
          f"{cfg['loop_implementation']}\n"
          f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores")
  lines = [head, "-" * (sum(widths) + 4)]
  lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in rows]
  return "\n".join(lines)
