"""The benchmark binary at the smallest sizes (that it works, not that it is fast):
sections rounds, bytes and adapters here, memory in `test_bench_memory.py` (a file of
its own, so the two runs go to both pytest processes); one-line errors for bad flags."""

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
def test_bench_rounds_bytes_and_adapters(tmp_path, namespace):
  """Sections rounds (1, 2, 5, 6; 7 on two TFF workers in a private network namespace),
  bytes (4) and adapters (8), under tf and cpp; no memory section."""
  out = tmp_path / "bench"
  first, second = Worker(namespace, tmp_path / "w1.log"), Worker(namespace, tmp_path / "w2.log")
  proc = _run_bench([f"--output_dir={out}", "--arch=tiny", "--clients=2",
                     "--examples_per_client=2", f"--rounds={ROUNDS}", "--image_size=96",
                     "--nomobile_sam", "--sections=rounds,bytes,adapters",
                     f"--workers={first.address},{second.address}"],
                    # A limit, not a speed check.
                    tmp_path, timeout=1200, namespace=namespace)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr

  # Progress lines as it goes, then the table.
  for line in ("[1/5] embedding precompute", "[1-2/5] federated rounds"):
    assert line in proc.stdout, proc.stdout[-3000:]
  assert "[3/5] memory" not in proc.stdout
  table = proc.stdout[proc.stdout.index("tff_sam benchmark:"):]
  for row in ("1 cache speed-up", "embedding precompute", "2 TFF overhead",
              "4 bytes/client/round", "full-model fine-tuning",
              "5 throughput, tiny", "5 throughput, mobile_sam", "6 execution tf",
              "  execution cpp", "tf / cpp cached round time"):
    assert row in table, table
  assert "3 memory" not in table and "tf memory" not in table

  result = json.loads((out / "bench.json").read_text())
  for key in ("cache_speedup", "tff_overhead"):
    assert isinstance(result[key], float) and _positive(result[key]), (key, result[key])
  assert "memory" not in result and "memory_ratio_64_vs_4" not in result
  assert result["memory_ratio_64_vs_4_tf"] is None
  _check_bytes(result, online=True)
  assert result["goals"]["lora_bytes_ratio"]["applicable"] is True  # Rank 4.

  # Raw timings, throughput, machine, goals computed from the values.
  rounds = result["timings"]["rounds"]
  assert set(rounds) == {"cached TFF", "plain tf.function", "cached TFF, dataset_reduce",
                         "online TFF", "cached TFF, cpp execution",  # No GPU: no online cpp.
                         "cached TFF, 1 worker", "cached TFF, 2 workers"}
  _check_workers(result, rounds, [first.address, second.address], table)
  # Section 6: tf (the installed execution, the default) and cpp side by side.
  executions = result["executions"]
  assert list(executions) == ["tf", "cpp"]
  assert executions["tf"]["cached_round_s"] == rounds["cached TFF"]["mean_s"]
  assert executions["cpp"]["cached_round_s"] == rounds["cached TFF, cpp execution"]["mean_s"]
  assert "memory_ratio_64_vs_4" not in executions["tf"]
  assert result["tf_vs_cpp_round_time"] == pytest.approx(
      executions["tf"]["cached_round_s"] / executions["cpp"]["cached_round_s"])
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
  _check_goals(result)
  assert result["goals"]["cache_speedup"]["applicable"] is False  # tiny, not ViT-B
  assert result["goals"]["tf_vs_cpp_round_time"]["applicable"] is True  # CPU, both ran
  assert result["goals"]["tf_vs_cpp_round_time_gpu"]["applicable"] is False
  assert result["goals"]["memory_ratio_64_vs_4"]["value"] is None  # Not run.
  assert not (out / "work").exists()


def _check_goals(result) -> None:
  """Each goal with a value: computed from it; without: not met, not applicable."""
  for key, goal in result["goals"].items():
    value = result.get(key.removesuffix("_gpu"))
    assert goal["value"] == value
    if value is None:
      assert not goal["met"] and not goal["applicable"], key
      continue
    expected = value >= goal["threshold"] if goal["goal"].startswith(">=") else (
        value <= goal["threshold"])
    assert goal["met"] == expected, key


def _check_workers(result, rounds, addresses, table: str) -> None:
  """Section 7: one client per worker, both workers computed in every timed round."""
  comm = result["bytes_per_client_round"]
  workers = result["workers"]
  assert workers["workers"] == addresses
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


def _check_bytes(result, *, online: bool) -> None:
  """Section 4: 4 x the parameter counts, and decoder-only < online < full model."""
  comm = result["bytes_per_client_round"]
  params = comm["parameters"]
  assert params["total"] == params["image_encoder"] + params["prompt_decoder"]
  assert 0 < params["trainable"] <= params["prompt_decoder"] < params["total"]
  cached, full = comm["cached"], comm["full_model"]
  assert cached["upload_update"] == 4 * params["trainable"]
  assert cached["broadcast_model"] == 4 * params["prompt_decoder"]
  assert full["broadcast_model"] == full["upload_update"] == 4 * params["total"]
  modes = [cached, full]
  if online:
    on = comm["online"]
    assert on["upload_update"] == cached["upload_update"]
    assert on["broadcast_model"] == 4 * params["total"]
    assert cached["upload"] < on["broadcast"] <= full["broadcast"]
    assert cached["total"] < on["total"] < full["total"]
    modes.append(on)
  else:
    assert "online" not in comm
  for mode in modes:
    assert mode["broadcast"] == mode["broadcast_model"] + mode["broadcast_other"]
    assert mode["upload"] == mode["upload_update"] + mode["upload_other"]
    assert mode["total"] == mode["broadcast"] + mode["upload"]
    # Weight + metrics + robust aggregation scalars: small next to the model.
    assert 0 < mode["upload_other"] < 1024 and 0 <= mode["broadcast_other"] < 1024
  _check_lora_bytes(result)


def _check_lora_bytes(result) -> None:
  """LoRA + decoder: the decoder-only bytes plus the adapters' both ways."""
  comm = result["bytes_per_client_round"]
  cached, lora_mode = comm["cached"], comm["lora"]
  adapters = lora_mode["upload_update"] - cached["upload_update"]
  assert adapters > 0 and lora_mode["broadcast_model"] - cached["broadcast_model"] == adapters
  assert adapters % 4 == 0 and adapters < cached["upload_update"]
  assert lora_mode["total"] == lora_mode["broadcast"] + lora_mode["upload"]
  assert result["lora_bytes_ratio"] == pytest.approx(lora_mode["total"] / cached["total"])
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


@pytest.mark.parametrize("args,expected", [
    (["--rounds=1"], "--rounds: must be >= 2"),
    (["--memory_clients=2", "--memory_base_clients=4"], "--memory_clients: must be >"),
    (["--clients=0"], "--clients: must be >= 1"),
    (["--max_concurrent_computation_calls=0"], "--max_concurrent_computation_calls:"),
    (["--execution=cpp,gpu"], "--execution: must list executions of ('cpp', 'tf'), "
     "got 'gpu'"),
    (["--execution=tf,tf"], "--execution: lists tf more than once"),
    (["--lora_rank=0"], "--lora_rank: must be >= 1"),
    (["--sections=rounds,speed"], "--sections: must list sections of ('rounds', "
     "'memory', 'bytes', 'adapters'), got 'speed'"),
    (["--sections="], "--sections: must list at least one section of ('rounds', "),
    (["--sections=memory", "--workers=localhost:1"], "--workers: are timed in the rounds "
     "section; add it to --sections"),
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
