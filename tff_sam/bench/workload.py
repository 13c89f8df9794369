"""What the benchmark trains on, and the training settings it trains with.

Synthetic images written to the work folder (`write_examples`), their embeddings
computed and timed (`precompute`), the clients' manifests (`write_client_manifests`),
and the `RunConfig` that `tff_sam.federated.learning.tasks.build_task` builds the benchmark's
processes from (`task_config`, `client_loop`).
"""

import time
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam.bench import settings as bench_settings
from tff_sam.data import cache
from tff_sam.data import discovery
from tff_sam.data import preprocess
from tff_sam.data import reading
from tff_sam.data import synthetic
from tff_sam.federated.learning import tasks
from tff_sam.models import sam as sam_lib


def task_config(config: bench_settings.BenchConfig, work_dir: Path, *, online: bool = False
                ) -> config_lib.RunConfig:
  """The training program's settings for the benchmark's clients.

  Box prompts, `prompts_per_image` and `batch_size` of `config`, one local epoch,
  its client learning rate and seed; everything else the program's defaults (loss
  `dice_ce`, IoU head trained, server SGD at learning rate 1, robust aggregation).

  Args:
    config: The benchmark's settings.
    work_dir: The benchmark's work folder (the config's `output_dir`).
    online: Online mode (`embedding_cache=False`): the model runs the image encoder.
  """
  return config_lib.RunConfig(
      output_dir=str(work_dir), prompt=config_lib.BOX_PROMPT,
      prompts_per_image=config.prompts_per_image, batch_size=config.batch_size,
      local_epochs=1, client_lr=config.client_lr, seed=config.seed,
      embedding_cache=not online).validate()


def client_loop(loop_implementation: str) -> str:
  """The `build_task` client loop of a `BenchConfig.loop_implementation`.

  `program` is the training program's (`tasks.LOOP_IMPLEMENTATION`); the others are
  that `tff.learning.LoopImplementation` (lower case).
  """
  if loop_implementation == "program":
    return tasks.LOOP_IMPLEMENTATION
  return loop_implementation


def compared_loop(loop_implementation: str) -> str:
  """The client loop the cached round is also timed with, for comparison.

  TFF's default `dataset_reduce`, or `dataset_iterator` when the run uses
  `dataset_reduce`.
  """
  return "dataset_iterator" if loop_implementation == "dataset_reduce" else "dataset_reduce"


def write_examples(folder: Path, *, count: int, size: int, seed: int
                   ) -> list[discovery.Example]:
  """Writes `count` synthetic image/mask pairs (rotating sites); returns the examples."""
  rng = np.random.default_rng(seed)
  for sub in ("images", "masks"):
    (folder / sub).mkdir(parents=True, exist_ok=True)
  for i in range(count):
    image, labels = synthetic.render_example(rng, site=i, height=size, width=size)
    cv2.imwrite(str(folder / "images" / f"ex{i:04d}.png"), image[..., ::-1])
    cv2.imwrite(str(folder / "masks" / f"ex{i:04d}.png"), labels)
  return discovery.list_examples(folder)


def precompute(bundle: sam_lib.SamBundle, examples: Sequence[discovery.Example], *,
               cache_root: Path, batch_size: int
               ) -> tuple[list[cache.Record], dict[str, float]]:
  """Embeds every example (records as `build_records` writes them), timed.

  Returns the records and `precompute_s` (end to end: reading, preprocessing,
  encoder tracing and calls, writing), `encoder_s_per_image` (the encoder alone,
  steady state: a second pass after a warm-up call) and the rates.
  """
  t0 = time.perf_counter()
  records, stats = cache.build_records(
      examples, bundle=bundle, cache_root=cache_root, binary_components=False,
      batch_size=batch_size, show_progress=False)
  precompute_s = time.perf_counter() - t0
  if stats.encoded != len(examples):
    raise RuntimeError(f"expected {len(examples)} fresh embeddings, encoded {stats.encoded}")
  side = sam_lib.image_size(bundle.config)
  pixels = [preprocess.preprocess(bundle.processor, image, labels, input_size=side).pixel_values
            for image, labels in (reading.load_example(e) for e in examples)]
  encode = bundle.encoder_fn()
  encode(tf.constant(np.stack(pixels[:batch_size])))  # trace + warm-up
  t0 = time.perf_counter()
  for start in range(0, len(pixels), batch_size):
    encode(tf.constant(np.stack(pixels[start:start + batch_size]))).numpy()
  encoder_s = time.perf_counter() - t0
  n = len(examples)
  return records, {"images": n, "precompute_s": precompute_s,
                   "precompute_images_per_s": n / precompute_s,
                   "encoder_s": encoder_s, "encoder_s_per_image": encoder_s / n,
                   "encoder_images_per_s": n / encoder_s}


def write_client_manifests(manifest_dir: Path, records: Sequence[cache.Record], *,
                           clients: int, per_client: int, prefix: str = "client"
                           ) -> list[str]:
  """Client k lists records [k * per_client, (k + 1) * per_client) (modulo the pool)."""
  pool = list(records)
  assignment = {f"{prefix}_{k:03d}": [pool[(k * per_client + i) % len(pool)]
                                     for i in range(per_client)] for k in range(clients)}
  counts = cache.write_manifests(manifest_dir, assignment)
  empty = [c for c, n in counts.items() if n == 0]
  if empty:
    raise RuntimeError(f"clients without objects to train on: {empty}")
  return sorted(assignment)
