"""Section 8 of the benchmark: what the adapted model's feature cache saves.

With `--adapter=lora` the clients' records can hold the frozen encoder's activations
where its first adapted stage starts (`--embedding_cache`) instead of images
(`--noembedding_cache`), so the stages before it do not run at every step. This
section times one LoRA training step (forward, gradients of the adapters and the
decoder, plain `tf.function`, no TFF) from cached features vs from pixel values, side
by side on the same images and prompts, and sizes one record's payload each way.
"""

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam.models import adapted
from tff_sam.models import build
from tff_sam.models import encoders
from tff_sam.models import lora as lora_lib
from tff_sam.models import sam as sam_lib


def _step_fn(model: adapted.AdaptedSamModel, inputs: dict[str, tf.Tensor]
             ) -> Callable[[], tf.Tensor]:
  """One SGD step of the adapters and the decoder on `inputs` (squared-logit loss)."""
  weights = model.trainable_weights

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(model(inputs, training=True)["masks"] ** 2)
    for w, g in zip(weights, tape.gradient(loss, weights)):
      if g is not None:
        w.assign_sub(1e-6 * g)
    return loss

  return step


def adapter_step_times(bundle: sam_lib.SamBundle, *, cache_root: Path, lora_rank: int,
                       batch_size: int, prompts_per_image: int, steps: int,
                       log: Callable[[str], None]) -> dict[str, Any]:
  """Median seconds of a LoRA training step from pixels vs from cached features.

  Args:
    bundle: The model (its encoder's site copy is written into `cache_root`).
    cache_root: Where the site copy goes.
    lora_rank: Rank of the adapters (on `qkv`, the default targets).
    batch_size: Images per step.
    prompts_per_image: Box prompts per image.
    steps: Timed steps per input kind (after one untimed tracing step), interleaved.
    log: Progress lines.

  Returns:
    `pixels_step_s`, `features_step_s`, `saving` (1 - features / pixels), the cut
    (`feature_start`, `feature_shape`) and the bytes of one image's features (float16,
    as cached), embedding (float16) and pixel values (float32).
  """
  kind = sam_lib.encoder_kind(bundle)
  side = sam_lib.image_size(bundle.config)
  start = adapted.feature_start(kind, embedding_cache=True)
  site = adapted.write_site_weights(bundle, cache_root=cache_root)
  spec = lora_lib.LoraSpec(rank=lora_rank, alpha=float(lora_rank))
  rng = np.random.default_rng(0)
  pixels = tf.constant(rng.normal(size=(batch_size, 3, side, side)).astype(np.float32))
  features = encoders.feature_fn(bundle, start=start)(pixels)
  lo = rng.uniform(0, side / 2, size=(batch_size, prompts_per_image, 2))
  boxes = tf.constant(np.concatenate([lo, lo + side / 4], axis=-1).astype(np.float32))
  steps_by_kind = {}
  for name, model_start, x in (("pixels", None, {"pixel_values": pixels}),
                               ("features", start, {"features": features})):
    model = build.build_adapted_model(bundle, site=site, lora=spec, start=model_start,
                                      prompt=config_lib.BOX_PROMPT)
    steps_by_kind[name] = _step_fn(model, {**x, "boxes": boxes})
    steps_by_kind[name]()  # Tracing.
  times: dict[str, list[float]] = {name: [] for name in steps_by_kind}
  for _ in range(steps):
    for name, step in steps_by_kind.items():
      t0 = time.perf_counter()
      step().numpy()
      times[name].append(time.perf_counter() - t0)
  pixels_s = statistics.median(times["pixels"])
  features_s = statistics.median(times["features"])
  shape = encoders.cut_shape(kind, bundle.config, start=start)
  emb = sam_lib.embedding_shape(bundle.config)
  out = {"model": bundle.name, "image_encoder": kind, "feature_start": start,
         "feature_cut": encoders.describe_start(kind, start), "feature_shape": list(shape),
         "batch_size": batch_size, "prompts_per_image": prompts_per_image,
         "pixels_step_s": pixels_s, "features_step_s": features_s,
         "saving": 1.0 - features_s / pixels_s, "steps": times,
         "feature_bytes_per_image": 2 * int(np.prod(shape)),
         "embedding_bytes_per_image": 2 * int(np.prod(emb)),
         "pixel_bytes_per_image": 4 * 3 * side * side}
  log(f"  {bundle.name}: LoRA step {pixels_s:.3f} s from pixels, {features_s:.3f} s from "
      f"cached features ({out['feature_cut']}): {100 * out['saving']:.1f}% saved; features "
      f"{out['feature_bytes_per_image'] / 1e6:.2f} MB/image vs embedding "
      f"{out['embedding_bytes_per_image'] / 1e6:.2f} MB")
  return out
