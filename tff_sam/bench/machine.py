"""The machine and the model a benchmark runs on: versions, hardware, parameter counts.

`load_bench_bundle` loads a benchmark architecture (`config.ARCHS`): SAM ViT-B with
random weights (`vit_b_random_bundle`, timing only), the tiny random-init SAM or
MobileSAM's real weights.
"""

import os
import sys
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import transformers

from tff_sam.bench import settings as bench_settings
from tff_sam.models import build
from tff_sam.models import decoder as decoder_lib
from tff_sam.models import sam as sam_lib

# SAM ViT-B (`transformers.SamConfig()` defaults): 93.7 M weights, i.e. the PyTorch
# checkpoint's 93,735,472 parameters plus the 2x128 random Fourier matrix of the
# positional embedding (a buffer in PyTorch, a weight in TF).
VIT_B_PARAMETERS = 93_735_728
GIB = 2.0**30


def _proc_value(path: str, prefix: str) -> Optional[str]:
  """The value after `prefix` on the first matching line of a /proc file, or None."""
  try:
    for line in Path(path).read_text().splitlines():
      if line.startswith(prefix):
        return line[len(prefix):]
  except OSError:
    pass
  return None


def machine_info() -> dict[str, Any]:
  """CPU model, cores, RAM, GPUs and the library versions the numbers were taken with."""
  cpu = _proc_value("/proc/cpuinfo", "model name")
  cpu = cpu.split(":", 1)[1].strip() if cpu is not None and ":" in cpu else "unknown"
  mem = _proc_value("/proc/meminfo", "MemTotal:")
  ram = int(mem.split()[0]) * 1024 if mem is not None else None
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  gpus = [tf.config.experimental.get_device_details(d).get("device_name", d.name)
          for d in tf.config.list_physical_devices("GPU")]
  return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": ram, "gpus": gpus,
          "load_average_at_start": list(load) if load else None,
          "python": sys.version.split()[0], "tensorflow": tf.__version__,
          "tensorflow_federated": tff.__version__, "transformers": transformers.__version__}


def vit_b_random_bundle() -> sam_lib.SamBundle:
  """A `SamBundle` with SAM ViT-B's architecture and random weights (for timing).

  The fingerprint is unique per call, so its embeddings are never reused.
  """
  config = transformers.SamConfig()
  sam = transformers.TFSamModel(config)
  # build_in_name_scope, not build(): see `tff_sam.models.build._build_tiny`.
  sam.build_in_name_scope()
  return sam_lib.SamBundle(
      name="vit_b (random init)", sam=sam, processor=sam_lib.build_image_processor(config),
      fingerprint=f"bench-vit_b-random-{uuid.uuid4().hex[:12]}")


def load_bench_bundle(arch: str, *, cache_dir: Optional[Path] = None) -> sam_lib.SamBundle:
  """The `SamBundle` of a benchmark architecture (`config.ARCHS`).

  Raises:
    errors.UserError: MobileSAM's weights are missing and cannot be fetched.
  """
  if arch == bench_settings.VIT_B_ARCH:
    return vit_b_random_bundle()
  return build.load_sam(arch, cache_dir=cache_dir)


def _count(weights: Iterable[tf.Variable]) -> int:
  return int(sum(int(np.prod(w.shape)) for w in weights))


def parameter_counts(bundle: sam_lib.SamBundle) -> dict[str, int]:
  """Weights of the model as used: image encoder, prompt encoder + decoder, total.

  `trainable` is what the federated processes train (the mask decoder incl. its IoU
  head); `prompt_decoder` adds the frozen prompt encoder and positional embedding.
  """
  encoder = bundle.image_encoder if bundle.image_encoder is not None else (
      bundle.sam.vision_encoder)
  decoder = build.build_prompt_mask_decoder(bundle)
  counts = {"image_encoder": _count(encoder.weights),
            "prompt_decoder": _count(decoder_lib.prompt_decoder_weights(bundle.sam).values()),
            "trainable": _count(decoder.trainable_weights)}
  counts["total"] = counts["image_encoder"] + counts["prompt_decoder"]
  return counts
