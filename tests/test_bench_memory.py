"""The benchmark's memory section (3, under tf and cpp) and its bytes section (4)
without the rounds, at the smallest sizes (that they work, not that anything is lean).

A file of its own so that it runs beside `test_bench.py`'s run in the other pytest
process."""

import json

import pytest

from test_bench import _check_bytes
from test_bench import _check_goals
from test_bench import _positive
from test_bench import _run_bench


@pytest.mark.slow
def test_bench_memory_and_bytes(tmp_path):
  """Sections memory (3, under tf and cpp, with section 6's memory rows) and bytes (4,
  without the rounds: no online process), LoRA rank 2."""
  out = tmp_path / "bench"
  proc = _run_bench([f"--output_dir={out}", "--arch=tiny", "--clients=2",
                     "--examples_per_client=2", "--image_size=96", "--memory_clients=4",
                     "--memory_base_clients=2", "--nomobile_sam", "--sections=memory,bytes",
                     "--lora_rank=2"], tmp_path, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert "[3/5] memory" in proc.stdout and "[1-2/5]" not in proc.stdout
  table = proc.stdout[proc.stdout.index("tff_sam benchmark:"):]
  for row in ("3 memory 4 vs 2 clients", "all 4 in 2 subrounds", "4 bytes/client/round",
              "LoRA r2 + decoder", "decoder, int8 uploads", "decoder, int4 uploads",
              "6 execution tf", "  execution cpp", "tf memory 4 vs 2 clients"):
    assert row in table, table
  for row in ("1 cache speed-up", "2 TFF overhead", "5 throughput", "tf / cpp cached",
              "8 LoRA feature cache", "online (encoder too)"):
    assert row not in table, table
  result = json.loads((out / "bench.json").read_text())
  for key in ("memory_ratio_64_vs_4", "memory_ratio_64_vs_4_subrounds"):
    assert isinstance(result[key], float) and _positive(result[key]), (key, result[key])
  runs = result["memory"]["runs"]
  for key, run in (("memory_ratio_64_vs_4", "large"),
                   ("memory_ratio_64_vs_4_subrounds", "large_subrounds")):
    assert result[key] == pytest.approx(runs[run]["peak_rss_bytes"]
                                        / runs["small"]["peak_rss_bytes"])
  assert {n: r["participants"] for n, r in runs.items()} == {
      "small": 2, "large": 4, "large_sampled": 2, "large_subrounds": 4}
  assert result["memory"]["subrounds"] == 2
  executions = result["executions"]
  assert list(executions) == ["tf", "cpp"] and "cached_round_s" not in executions["tf"]
  cpp_runs = result["memory"]["executions"]["cpp"]["runs"]
  assert {n: r["participants"] for n, r in cpp_runs.items()} == {"small": 2, "large": 4}
  assert result["memory_ratio_64_vs_4_tf"] == pytest.approx(result["memory_ratio_64_vs_4"])
  assert executions["cpp"]["memory_ratio_64_vs_4"] == pytest.approx(
      cpp_runs["large"]["peak_rss_bytes"] / cpp_runs["small"]["peak_rss_bytes"])
  assert result["tf_vs_cpp_round_time"] is None and "timings" in result
  assert "rounds" not in result["timings"] and "cache_speedup" not in result
  _check_bytes(result, online=False)
  assert result["goals"]["lora_bytes_ratio"]["applicable"] is False  # Rank 2, not the goal's 4.
  comm = result["bytes_per_client_round"]
  adapters = comm["lora"]["upload_update"] - comm["cached"]["upload_update"]
  # Rank 2 on qkv of the tiny ViT's 2 blocks: (32 x 2 + 2 x 96) floats each.
  assert adapters == 4 * 2 * (32 * 2 + 2 * 96)
  _check_goals(result)
  assert result["goals"]["tff_overhead"] == {
      "value": None, "goal": "<= 1.05", "threshold": 1.05, "met": False, "applicable": False}
  assert not (out / "work").exists()
