#!/usr/bin/env bash
# The one prepared check for a machine with an NVIDIA GPU (docs/execution.md, "On a GPU").
#
#   tools/gpu_check.sh            # from the checkout; writes runs/gpu_check/
#
# 1. builds the GPU environment (`make install GPU=1`; idempotent) and checks that
#    TensorFlow in the project's Python sees the GPU;
# 2. runs the benchmark at ViT-B size under both executions, tf first (every section
#    under tf; the cached and online rounds and the memory runs under cpp too);
# 3. runs 2 rounds of the demo under --execution=tf;
# 4. samples `nvidia-smi` every 0.5 s throughout (runs/gpu_check/nvidia_smi.csv) and
#    prints a verdict: tf/cpp round time, GPU utilisation while the rounds ran, and
#    whether the demo ran under tf.
#
# Budget: under 8 minutes with the wheels and the sample data already cached (the
# benchmark is sized down for it; TIME_LIMIT caps each step). Paste the output into
# BENCHMARKS.md with the GPU model.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
TIME_LIMIT=${TIME_LIMIT:-300}
PY=.venv/bin/python
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi -L failed); nothing to check" >&2
  exit 2
fi
mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/gpus.txt"
nvidia-smi --query-gpu=timestamp,name,utilization.gpu,memory.used,memory.total \
  --format=csv,noheader,nounits -lms 500 > "$OUT/nvidia_smi.csv" 2>/dev/null &
SMI=$!
trap 'kill $SMI 2>/dev/null' EXIT

echo "== [1/3] environment ($(elapsed) s)"
make install GPU=1 || { echo "gpu_check: make install GPU=1 failed" >&2; exit 1; }
$PY -c "import tensorflow as tf; g = tf.config.list_physical_devices('GPU'); print('TensorFlow sees', g); raise SystemExit(0 if g else 1)" \
  || { echo "gpu_check: TensorFlow sees no GPU after make install GPU=1" >&2; exit 1; }

echo "== [2/3] benchmark, ViT-B, --execution=tf,cpp ($(elapsed) s)"
bench_start=$(date +%s)
timeout "$TIME_LIMIT" $PY -m tff_sam.experiments.bench --output_dir="$OUT/bench" --arch=vit_b \
  --execution=tf,cpp --clients=2 --examples_per_client=2 --rounds=2 --memory_clients=4 \
  --memory_base_clients=2 --nomobile_sam
bench_rc=$?
bench_end=$(date +%s)

echo "== [3/3] demo, 2 rounds, --execution=tf ($(elapsed) s)"
demo_start=$(date +%s)
timeout "$TIME_LIMIT" $PY -m tff_sam.experiments.run --flagfile=experiments/demo.flags \
  --rounds=2 --eval_every=2 --execution=tf --output_dir="$OUT/demo" --fresh
demo_rc=$?
demo_end=$(date +%s)
kill $SMI 2>/dev/null

echo "== verdict ($(elapsed) s in all)"
$PY - "$OUT" "$bench_rc" "$demo_rc" "$bench_start" "$bench_end" "$demo_start" "$demo_end" <<'EOF'
import csv, datetime, json, sys
from pathlib import Path
out, bench_rc, demo_rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
windows = {"bench": (float(sys.argv[4]), float(sys.argv[5])),
           "demo": (float(sys.argv[6]), float(sys.argv[7]))}
samples = []
with open(out / "nvidia_smi.csv") as f:
  for row in csv.reader(f):
    try:
      t = datetime.datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
      samples.append((t, float(row[2]), float(row[3])))
    except (ValueError, IndexError):
      pass
for name, (a, b) in windows.items():
  during = [(u, m) for t, u, m in samples if a <= t <= b]
  if during:
    busy = sum(u > 0 for u, _ in during) / len(during)
    print(f"{name}: GPU utilisation mean {sum(u for u, _ in during) / len(during):.0f}%, "
          f"max {max(u for u, _ in during):.0f}%, busy in {busy:.0%} of {len(during)} samples; "
          f"memory max {max(m for _, m in during):.0f} MiB")
  else:
    print(f"{name}: no nvidia-smi samples")
verdict = []
try:
  bench = json.loads((out / "bench" / "bench.json").read_text())
  ex = bench["executions"]
  print(f"bench: cached round tf {ex['tf']['cached_round_s']:.3f} s vs cpp "
        f"{ex['cpp']['cached_round_s']:.3f} s -> tf/cpp {bench['tf_vs_cpp_round_time']:.3f}"
        + (f"; online tf {ex['tf']['online_round_s']:.2f} s vs cpp {ex['cpp']['online_round_s']:.2f} s"
           if ex["tf"]["online_round_s"] and ex["cpp"]["online_round_s"] else ""))
  goal = bench["goals"]["tf_vs_cpp_round_time_gpu"]
  verdict.append(f"tf >= 20x faster than cpp: {'met' if goal['met'] else 'NOT met'}")
except (OSError, KeyError, TypeError, ValueError) as e:
  verdict.append(f"bench did not finish (exit {bench_rc}; {e!r})")
try:
  summary = json.loads((out / "demo" / "summary.json").read_text())
  verdict.append(f"demo under {summary['config']['execution']}: held-out dice "
                 f"{summary['baseline']['dice']:.4f} -> {summary['final']['dice']:.4f}")
except (OSError, KeyError, ValueError) as e:
  verdict.append(f"demo did not finish (exit {demo_rc}; {e!r})")
print("verdict: " + "; ".join(verdict))
EOF
