"""The benchmark's settings: `BenchConfig`, built once from the flags of
`tff_sam.experiments.bench` and validated before TensorFlow loads (this module
imports no TensorFlow), and the names its flags take.
"""

import dataclasses
from typing import Any, Optional

from tff_sam import config as config_lib
from tff_sam import errors

# Benchmark architectures: SAM ViT-B with random weights (timing only), the tiny
# random-init SAM, MobileSAM's real weights.
VIT_B_ARCH = "vit_b"
ARCHS = (VIT_B_ARCH, config_lib.TINY_MODEL, config_lib.MOBILE_SAM_MODEL)
# The benchmark's sections (`--sections`): `rounds` = sections 1, 2, 5, 6 and 7 (the
# timed rounds and what is read off them), `memory` = 3, `bytes` = 4, `adapters` = 8.
ROUNDS_SECTION = "rounds"
MEMORY_SECTION = "memory"
BYTES_SECTION = "bytes"
ADAPTERS_SECTION = "adapters"
BENCH_SECTIONS = (ROUNDS_SECTION, MEMORY_SECTION, BYTES_SECTION, ADAPTERS_SECTION)
# The benchmark's client training loop: `program` = as the training program builds
# it, else that `tff.learning.LoopImplementation` (lower case).
LOOP_IMPLEMENTATIONS = ("program", "dataset_iterator", "dataset_reduce")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """The benchmark's settings (the flags of `tff_sam.experiments.bench`, one to one).

  Attributes:
    output_dir: Where `bench.json` (and, during the run, the work folder) goes.
    arch: `vit_b` (SAM ViT-B architecture, random weights), `tiny` or `mobile_sam`.
    clients: Clients per round in sections 1, 2 and 5 (all participate).
    examples_per_client: Images per client (same count in the memory section).
    batch_size: Images per local batch.
    prompts_per_image: Prompts (objects) per image per local epoch.
    rounds: Timed rounds per loop (after one untimed warm-up round).
    image_size: Side of the synthetic images (SAM resizes them to its input size).
    encode_batch_size: Images per encoder call in the precompute.
    memory_clients: Clients of the large memory run.
    memory_base_clients: Clients of the small memory run (and sampled per round in
      the large population run).
    memory_interval: Seconds between RSS samples.
    max_concurrent_computation_calls: TFF's C++ runtime limit (-1 = none, as the
      training binary runs), also used by the memory subprocesses.
    mobile_sam: Also measure MobileSAM's throughput when its weights are present.
    cache_dir: Cache root holding converted MobileSAM weights (default
      `$TFF_SAM_CACHE` or `~/.cache/tff_sam`); embeddings go to the work folder.
    client_lr: Client Adam learning rate.
    executions: The executions compared (`config_lib.EXECUTIONS`): every section runs under the
      first; the cached round (and, when TensorFlow sees a GPU, the online round) and
      the 64 vs 4 clients memory runs also under each of the others, side by side.
    loop_implementation: The client training loop of every TFF process of the run
      (`LOOP_IMPLEMENTATIONS`); the cached round is also timed with
      `compared_loop(loop_implementation)` for comparison.
    workers: `host:port` of running TFF workers: section 7 times the cached round on
      the first alone vs on all of them (empty: no section 7).
    lora_rank: Rank of the LoRA adapters (on `qkv`) of section 4's LoRA + decoder
      process and section 8's training steps.
    sections: The sections to run (`BENCH_SECTIONS`), e.g. (`bytes`, `adapters`) for
      what concerns `--adapter=lora` alone at ViT-B size, whose online round does not
      fit 24 GiB.
    seed: Seed of the synthetic images and the prompts.
    keep_work: Keep the work folder (images, records, manifests) after the run.
  """

  output_dir: str = "runs/bench"
  arch: str = VIT_B_ARCH
  clients: int = 2
  examples_per_client: int = 4
  # Batch 1 (training and encoding): with two clients, online mode at ViT-B size peaked
  # at 9.8 GiB in TFF's worker at batch 1 and at over 14 GiB at batch 2 (BENCHMARKS.md).
  batch_size: int = 1
  # One box per image: the unit of the ceiling ("decoder step 0.11 s/example")
  # and of the published federated-SAM recipes, where an example is one prompted image.
  # Every extra prompt re-runs the decoder over the whole image embedding, so with 4 the
  # decoder step costs about 4x and the cached round's lead shrinks (BENCHMARKS.md).
  prompts_per_image: int = 1
  rounds: int = 3
  image_size: int = 256
  encode_batch_size: int = 1
  memory_clients: int = 64
  memory_base_clients: int = 4
  memory_interval: float = 0.1
  max_concurrent_computation_calls: int = -1
  mobile_sam: bool = True
  cache_dir: Optional[str] = None
  client_lr: float = 1e-5
  executions: tuple[str, ...] = (config_lib.TF_EXECUTION, config_lib.CPP_EXECUTION)
  loop_implementation: str = "program"
  workers: tuple[str, ...] = ()
  lora_rank: int = 4
  sections: tuple[str, ...] = BENCH_SECTIONS
  seed: int = 0
  keep_work: bool = False

  def validate(self) -> "BenchConfig":
    """Checks every field; returns self.

    Raises:
      errors.ConfigError: naming the first invalid flag.
    """
    errors.require(bool(self.output_dir), "output_dir", "must be set")
    errors.require(self.arch in ARCHS, "arch", f"must be one of {ARCHS}, got {self.arch!r}")
    config_lib.require_at_least(self, 1, ("clients", "examples_per_client", "batch_size",
                               "prompts_per_image", "encode_batch_size", "memory_base_clients"))
    errors.require(self.rounds >= 2, "rounds", f"must be >= 2 timed rounds, got {self.rounds}")
    errors.require(self.image_size >= 32, "image_size", f"must be >= 32 pixels, got {self.image_size}")
    errors.require(self.memory_clients > self.memory_base_clients, "memory_clients",
                   f"must be > --memory_base_clients ({self.memory_base_clients}), got "
                   f"{self.memory_clients}")
    errors.require(self.memory_interval > 0, "memory_interval",
                   f"must be > 0 seconds, got {self.memory_interval}")
    errors.require(self.max_concurrent_computation_calls == -1
                   or self.max_concurrent_computation_calls >= 1, "max_concurrent_computation_calls",
                   f"must be -1 (no limit) or >= 1, got {self.max_concurrent_computation_calls}")
    errors.require(self.client_lr > 0, "client_lr", f"must be > 0, got {self.client_lr}")
    config_lib.require_choices(self.executions, config_lib.EXECUTIONS, "execution", "execution")
    config_lib.validate_workers(self.workers)
    config_lib.require_choices(self.sections, BENCH_SECTIONS, "sections", "section")
    errors.require(not self.workers or ROUNDS_SECTION in self.sections, "workers",
                   f"are timed in the {ROUNDS_SECTION} section; add it to --sections")
    errors.require(self.lora_rank >= 1, "lora_rank", f"must be >= 1, got {self.lora_rank}")
    errors.require(self.loop_implementation in LOOP_IMPLEMENTATIONS, "loop_implementation",
                   f"must be one of {LOOP_IMPLEMENTATIONS}, got {self.loop_implementation!r}")
    errors.require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
    return self

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
