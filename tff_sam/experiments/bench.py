r"""Benchmark: embedding-cache speed-up, TFF overhead, memory, bytes, throughput.

  python -m tff_sam.experiments.bench [--arch vit_b|tiny|mobile_sam] \
      [--clients 2 --examples_per_client 4 --rounds 3] [--output_dir runs/bench]

Prints a table and writes OUTPUT_DIR/bench.json (see BENCHMARKS.md for what each
number means). Every ratio is measured side by side in one run. Flags are copied once
into a validated `bench.settings.BenchConfig`; mistakes end with one `error:` line, exit 1.
"""

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF and TFF's C++ worker: errors only.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # No TF-deprecation banner.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from tff_sam import runtime
from tff_sam.bench import settings as bench_settings

# Defaults live in one place: the dataclass.
_F = {f.name: f.default for f in dataclasses.fields(bench_settings.BenchConfig)}

flags.DEFINE_string("output_dir", _F["output_dir"], "Where bench.json goes (a work/ folder "
                    "with synthetic images, records and manifests lives there during the run).")
flags.DEFINE_enum("arch", _F["arch"], bench_settings.ARCHS,
                  "vit_b: SAM ViT-B architecture with random weights (timing only); tiny: "
                  "the small random-init SAM (smoke runs); mobile_sam: MobileSAM's weights.")
flags.DEFINE_integer("clients", _F["clients"], "Clients per round (all participate) in the "
                     "speed-up, overhead and throughput sections.")
flags.DEFINE_integer("examples_per_client", _F["examples_per_client"],
                     "Images per client (also in the memory section).")
flags.DEFINE_integer("batch_size", _F["batch_size"], "Images per local batch.")
flags.DEFINE_integer("prompts_per_image", _F["prompts_per_image"],
                     "Box prompts (objects) per image per local epoch.")
flags.DEFINE_integer("rounds", _F["rounds"],
                     "Timed rounds per loop (>= 2), after one untimed warm-up (tracing) round.")
flags.DEFINE_integer("image_size", _F["image_size"],
                     "Side of the synthetic images (SAM resizes them to its input size).")
flags.DEFINE_integer("encode_batch_size", _F["encode_batch_size"],
                     "Images per image-encoder call in the precompute.")
flags.DEFINE_integer("memory_clients", _F["memory_clients"],
                     "Clients of the large memory run (all participate in its round).")
flags.DEFINE_integer("memory_base_clients", _F["memory_base_clients"],
                     "Clients of the small memory run (and sampled per round from the large "
                     "population in the third memory run).")
flags.DEFINE_float("memory_interval", _F["memory_interval"], "Seconds between RSS samples.")
flags.DEFINE_integer("max_concurrent_computation_calls", _F["max_concurrent_computation_calls"],
                     "TFF C++ runtime: max concurrent calls of one computation (-1 = no limit, "
                     "as the training binary runs); also used by the memory subprocesses.")
flags.DEFINE_boolean("mobile_sam", _F["mobile_sam"],
                     "Also measure MobileSAM's throughput when its weights are present "
                     "(reported as skipped otherwise).")
flags.DEFINE_string("cache_dir", None, "Cache holding converted MobileSAM weights (default "
                    "$TFF_SAM_CACHE or ~/.cache/tff_sam). Embeddings go to the work folder.")
flags.DEFINE_float("client_lr", _F["client_lr"], "Client Adam learning rate.")
flags.DEFINE_enum("loop_implementation", _F["loop_implementation"],
                  bench_settings.LOOP_IMPLEMENTATIONS,
                  "Client training loop of every TFF process: program = as the training "
                  "program builds it; dataset_iterator / dataset_reduce = that "
                  "tff.learning.LoopImplementation. The cached round is also timed with "
                  "dataset_reduce (TFF's default loop) for comparison, or with "
                  "dataset_iterator when this is dataset_reduce.")
flags.DEFINE_list("execution", list(_F["executions"]),
                  "Executions to compare (tf, cpp): every section runs under the first; the "
                  "cached round (and the online round when TensorFlow sees a GPU) and the "
                  "memory runs of 64 vs 4 clients also under the others, side by side.")
flags.DEFINE_list("workers", [], "host:port,... of running TFF workers (python -m "
                  "tff_sam.experiments.worker --port P): section 7 times the cached round on "
                  "the first worker alone vs on all of them, with each worker's CPU seconds.")
flags.DEFINE_integer("lora_rank", _F["lora_rank"], "Rank of the LoRA adapters (on qkv) of "
                     "section 4's LoRA + decoder process and section 8's training steps.")
flags.DEFINE_list("sections", list(_F["sections"]),
                  "Sections to run: rounds (1 cache speed-up, 2 TFF overhead, 5 throughput, "
                  "6 executions, 7 workers), memory (3), bytes (4, bytes per client and "
                  "round), adapters (8, a LoRA step from pixels vs from cached features). "
                  "E.g. --sections=bytes,adapters at --arch=vit_b.")
flags.DEFINE_integer("seed", _F["seed"], "Seed of the synthetic images and the prompts.")
flags.DEFINE_boolean("keep_work", _F["keep_work"],
                     "Keep OUTPUT_DIR/work (images, records, manifests) after the run.")

FLAGS = flags.FLAGS


def config_from_flags() -> bench_settings.BenchConfig:
  """Copies the flags into a validated `BenchConfig` (the only place flags are read)."""
  names = {"executions": "execution"}  # Flag names that differ from the field's.
  values = {f.name: FLAGS[names.get(f.name, f.name)].value
            for f in dataclasses.fields(bench_settings.BenchConfig)}
  values["executions"] = tuple(values["executions"])
  values["workers"] = tuple(values["workers"])
  values["sections"] = tuple(values["sections"])
  return bench_settings.BenchConfig(**values).validate()


def _log(line: str) -> None:
  print(line, flush=True)


def main(argv):
  runtime.begin_binary(argv, warnings_only=not FLAGS["verbosity"].present)

  def job(config: bench_settings.BenchConfig):
    # lazy: TensorFlow and TFF load only after the flags are checked.
    from tff_sam.bench import runner  # pylint: disable=g-import-not-at-top
    from tff_sam.federated.backends import execution  # pylint: disable=g-import-not-at-top
    execution.configure_tff_execution(
        execution=config.executions[0],
        max_concurrent_computation_calls=config.max_concurrent_computation_calls)
    runner.run_benchmark(config, log=_log)

  return runtime.run_job(job, settings=config_from_flags, cleanup=runtime.end_local_workers_if_loaded)


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
