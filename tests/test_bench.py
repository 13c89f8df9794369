"""The benchmark binary: a smoke run at the smallest sizes (that it works, not that it is
fast), and one-line errors for bad flags."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import Worker
from tff_sam.bench import loops

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 2


def _run_bench(args, tmp_path, timeout, namespace=None):
  env = dict(os.environ, TFF_SAM_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
  cmd = [sys.executable, "-m", "tff_sam.experiments.bench", *args]
  if namespace is not None:  # Inside the namespace of its --workers.
    return namespace.run(cmd, timeout=timeout, env=env)
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env,
                        timeout=timeout, check=False)


def _positive(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_bench_smoke_run_writes_table_and_json(tmp_path, namespace):
  """Every section, section 7 on two TFF workers in a private network namespace."""
  out = tmp_path / "bench"
  first, second = Worker(namespace, tmp_path / "w1.log"), Worker(namespace, tmp_path / "w2.log")
  proc = _run_bench([f"--output_dir={out}", "--arch=tiny", "--clients=2",
                     "--examples_per_client=2", f"--rounds={ROUNDS}", "--image_size=96",
                     "--memory_clients=4", "--memory_base_clients=2", "--nomobile_sam",
                     f"--workers={first.address},{second.address}"],
                    # 6 minutes alone on a slower 2-core host without section 7, over
                    # 15 beside the suite's other process: a limit, not a speed check.
                    tmp_path, timeout=2400, namespace=namespace)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr

  # Progress lines as it goes, then the table.
  for line in ("[1/5] embedding precompute", "[1-2/5] federated rounds", "[3/5] memory"):
    assert line in proc.stdout, proc.stdout[-3000:]
  table = proc.stdout[proc.stdout.index("tff_sam benchmark:"):]
  for row in ("1 cache speed-up", "embedding precompute", "2 TFF overhead",
              "3 memory 4 vs 2 clients", "4 bytes/client/round", "full-model fine-tuning",
              "5 throughput, tiny", "5 throughput, mobile_sam", "6 execution tf",
              "  execution cpp", "tf / cpp cached round time", "tf memory 4 vs 2 clients"):
    assert row in table, table

  result = json.loads((out / "bench.json").read_text())
  for key in ("cache_speedup", "tff_overhead", "memory_ratio_64_vs_4",
              "memory_ratio_64_vs_4_subrounds"):
    assert isinstance(result[key], float) and _positive(result[key]), (key, result[key])
  runs = result["memory"]["runs"]
  for key, run in (("memory_ratio_64_vs_4", "large"),
                   ("memory_ratio_64_vs_4_subrounds", "large_subrounds")):
    assert result[key] == pytest.approx(runs[run]["peak_rss_bytes"]
                                        / runs["small"]["peak_rss_bytes"])
  assert {n: r["participants"] for n, r in runs.items()} == {
      "small": 2, "large": 4, "large_sampled": 2, "large_subrounds": 4}
  assert result["memory"]["subrounds"] == 2
  assert "all 4 in 2 subrounds" in table

  # Bytes: 4 x the parameter counts, and decoder-only < online < full model.
  comm = result["bytes_per_client_round"]
  params = comm["parameters"]
  assert params["total"] == params["image_encoder"] + params["prompt_decoder"]
  assert 0 < params["trainable"] <= params["prompt_decoder"] < params["total"]
  cached, online, full = comm["cached"], comm["online"], comm["full_model"]
  assert cached["upload_update"] == online["upload_update"] == 4 * params["trainable"]
  assert cached["broadcast_model"] == 4 * params["prompt_decoder"]
  assert online["broadcast_model"] == 4 * params["total"]
  assert full["broadcast_model"] == full["upload_update"] == 4 * params["total"]
  for mode in (cached, online, full):
    assert mode["broadcast"] == mode["broadcast_model"] + mode["broadcast_other"]
    assert mode["upload"] == mode["upload_update"] + mode["upload_other"]
    assert mode["total"] == mode["broadcast"] + mode["upload"]
    # Weight + metrics + robust aggregation scalars: small next to the model.
    assert 0 < mode["upload_other"] < 1024 and 0 <= mode["broadcast_other"] < 1024
  assert cached["upload"] < online["broadcast"] <= full["broadcast"]
  assert cached["total"] < online["total"] < full["total"]
  _check_lora_bytes(result)

  # Raw timings, throughput, machine, goals computed from the values.
  rounds = result["timings"]["rounds"]
  assert set(rounds) == {"cached TFF", "plain tf.function", "cached TFF, dataset_reduce",
                         "online TFF", "cached TFF, cpp execution",  # No GPU: no online cpp.
                         "cached TFF, 1 worker", "cached TFF, 2 workers"}
  # Section 7: one client per worker, both workers computed in every timed round.
  workers = result["workers"]
  assert workers["workers"] == [first.address, second.address]
  assert set(workers["runs"]) == {"1", "2"}
  for n, run in workers["runs"].items():
    timed = rounds[f"cached TFF, {n} worker{'s' if n == '2' else ''}"]
    assert run["round_s"] == pytest.approx(float(np.median(timed["round_s"])))
    assert run["mean_round_s"] == timed["mean_s"]
    assert len(run["rounds"]) == ROUNDS  # The timed rounds, without the warm-up.
    for address, cpu in run["cpu_s"].items():
      assert _positive(cpu) and _positive(run["busy_s"][address]), (n, address)
    sizes = run["bytes_per_round"]
    assert sizes["num_subrounds"] == int(n) and sizes["merges"] == int(n) - 1
    # Per sub-round: the server state in (the decoder and more), an update-sized partial out.
    assert sizes["up_to_merge_in"] >= comm["cached"]["broadcast_model"]
    assert sizes["partial_aggregate"] >= comm["cached"]["upload_update"]
  assert workers["runs"]["1"]["overlap_s"] == 0.0  # One worker: nothing at the same time.
  assert workers["runs"]["2"]["overlap_s"] > 0.0
  assert workers["speedup"] == pytest.approx(workers["runs"]["1"]["round_s"]
                                             / workers["runs"]["2"]["round_s"])
  assert "7 workers: 1" in table and "1 worker / all workers" in table
  # Section 6: tf (the installed execution, the default) and cpp side by side.
  executions = result["executions"]
  assert list(executions) == ["tf", "cpp"]
  assert executions["tf"]["cached_round_s"] == rounds["cached TFF"]["mean_s"]
  assert executions["cpp"]["cached_round_s"] == rounds["cached TFF, cpp execution"]["mean_s"]
  assert result["tf_vs_cpp_round_time"] == pytest.approx(
      executions["tf"]["cached_round_s"] / executions["cpp"]["cached_round_s"])
  cpp_runs = result["memory"]["executions"]["cpp"]["runs"]
  assert {n: r["participants"] for n, r in cpp_runs.items()} == {"small": 2, "large": 4}
  assert result["memory_ratio_64_vs_4_tf"] == pytest.approx(result["memory_ratio_64_vs_4"])
  assert executions["cpp"]["memory_ratio_64_vs_4"] == pytest.approx(
      cpp_runs["large"]["peak_rss_bytes"] / cpp_runs["small"]["peak_rss_bytes"])
  assert result["machine"]["gpus"] == []
  compared = result["overhead"]["compared"]
  assert compared["loop_implementation"] == "dataset_reduce"
  assert _positive(compared["tff_overhead"])
  for loop in rounds.values():
    assert len(loop["round_s"]) == ROUNDS and all(_positive(s) for s in loop["round_s"])
    assert _positive(loop["warmup_s"]) and loop["examples_per_round"] == 4
  assert _positive(result["timings"]["precompute"]["precompute_s"])
  tiny = result["throughput"]["tiny"]
  for key in ("decoder_examples_per_s", "decoder_prompts_per_s", "precompute_images_per_s",
              "encoder_images_per_s"):
    assert _positive(tiny[key]), key
  assert "skipped" in result["throughput"]["mobile_sam"]
  _check_adapter_cache(result, table, arch="tiny")
  assert "skipped" in result["adapter_cache"]["mobile_sam"]
  assert result["machine"]["cores"] == os.cpu_count() and _positive(result["machine"]["ram_bytes"])
  assert result["config"]["arch"] == "tiny"
  for key, goal in result["goals"].items():
    value = result[key.removesuffix("_gpu")]
    assert goal["value"] == value
    expected = value >= goal["threshold"] if goal["goal"].startswith(">=") else (
        value <= goal["threshold"])
    assert goal["met"] == expected, key
  assert result["goals"]["cache_speedup"]["applicable"] is False  # tiny, not ViT-B
  assert result["goals"]["tf_vs_cpp_round_time"]["applicable"] is True  # CPU, both ran
  assert result["goals"]["tf_vs_cpp_round_time_gpu"]["applicable"] is False
  assert not (out / "work").exists()


def _check_lora_bytes(result) -> None:
  """LoRA + decoder: the decoder-only bytes plus the adapters' both ways."""
  comm = result["bytes_per_client_round"]
  cached, lora_mode = comm["cached"], comm["lora"]
  adapters = lora_mode["upload_update"] - cached["upload_update"]
  assert adapters > 0 and lora_mode["broadcast_model"] - cached["broadcast_model"] == adapters
  assert adapters % 4 == 0 and adapters < cached["upload_update"]
  assert lora_mode["total"] == lora_mode["broadcast"] + lora_mode["upload"]
  assert result["lora_bytes_ratio"] == pytest.approx(lora_mode["total"] / cached["total"])
  assert result["goals"]["lora_bytes_ratio"]["applicable"] is True  # Rank 4.
  # Compressed uploads: smaller uploads of the update, the same downloads.
  int8, int4 = comm["int8"], comm["int4"]
  assert int4["upload_update"] < int8["upload_update"] < cached["upload_update"] / 3
  assert int8["broadcast"] == int4["broadcast"] == cached["broadcast"]
  assert result["int8_upload_mb"] == pytest.approx(int8["upload_update"] / 1e6)
  assert result["goals"]["int8_upload_mb"]["applicable"] is False  # Tiny, not SAM's decoder.


def _check_adapter_cache(result, table: str, *, arch: str) -> None:
  a = result["adapter_cache"][arch]
  assert _positive(a["pixels_step_s"]) and _positive(a["features_step_s"])
  assert a["saving"] == pytest.approx(1 - a["features_step_s"] / a["pixels_step_s"])
  assert len(a["steps"]["pixels"]) == len(a["steps"]["features"]) == ROUNDS
  assert a["feature_bytes_per_image"] == 2 * int(np.prod(a["feature_shape"]))
  assert f"8 LoRA feature cache, {arch}" in table


@pytest.mark.slow
def test_bench_adapters_only(tmp_path):
  """`--adapters_only`: sections 4 and 8 alone."""
  out = tmp_path / "bench"
  proc = _run_bench([f"--output_dir={out}", "--arch=tiny", "--clients=1", f"--rounds={ROUNDS}",
                     "--nomobile_sam", "--adapters_only", "--lora_rank=2"], tmp_path,
                    timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = proc.stdout[proc.stdout.index("tff_sam benchmark:"):]
  assert "LoRA r2 + decoder" in table and "1 cache speed-up" not in table
  assert "decoder, int8 uploads" in table and "decoder, int4 uploads" in table
  result = json.loads((out / "bench.json").read_text())
  assert "timings" in result and "rounds" not in result["timings"]
  assert result["goals"]["lora_bytes_ratio"]["applicable"] is False  # Rank 2, not the goal's 4.
  assert not any(g["applicable"] for g in result["goals"].values())
  comm = result["bytes_per_client_round"]
  adapters = comm["lora"]["upload_update"] - comm["cached"]["upload_update"]
  # Rank 2 on qkv of the tiny ViT's 2 blocks: (32 x 2 + 2 x 96) floats each.
  assert adapters == 4 * 2 * (32 * 2 + 2 * 96)
  _check_adapter_cache(result, table, arch="tiny")


@pytest.mark.parametrize("args,expected", [
    (["--rounds=1"], "--rounds: must be >= 2"),
    (["--memory_clients=2", "--memory_base_clients=4"], "--memory_clients: must be >"),
    (["--clients=0"], "--clients: must be >= 1"),
    (["--max_concurrent_computation_calls=0"], "--max_concurrent_computation_calls:"),
    (["--execution=cpp,gpu"], "--execution: must list distinct executions of ('cpp', 'tf'), "
     "got cpp,gpu"),
    (["--execution=tf,tf"], "--execution: must list distinct"),
    (["--lora_rank=0"], "--lora_rank: must be >= 1"),
])
def test_bench_bad_flag_is_one_error_line(tmp_path, run_binary, args, expected):
  result = run_binary("bench", f"--output_dir={tmp_path / 'o'}", "--arch=tiny", *args)
  assert result.code == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert len(result.error_lines()) == 1, result.stderr[-2000:]
  assert expected in result.error_lines()[0]
  assert not (tmp_path / "o").exists()


def test_concurrent_seconds_counts_only_time_two_workers_overlap():
  assert loops.concurrent_seconds([[(0, 4)], [(1, 2), (3, 6)]]) == 2.0
  assert loops.concurrent_seconds([[(0, 1), (0.5, 2)], [(1.5, 3)]]) == 0.5  # Own overlaps merge.
  assert loops.concurrent_seconds([[(0, 1)], [(1, 2)], []]) == 0.0
  assert loops.concurrent_seconds([[(0, 3)], [(1, 2)], [(1.5, 2.5)]]) == 1.5
