"""LoRA in SAM's image encoders: trained low-rank updates of frozen linear layers.

LoRA (Hu et al., 2021) turns a frozen linear map `x W + b` into
`x W + b + (alpha / r) (x A) B` with `A` (d_in, r) and `B` (r, d_out) trained. `B`
starts at zero, so an adapted model starts exactly at its base model. `add_lora` puts
adapters into every transformer block of either image encoder (`encoders`): SAM's
ViT (`TFSamVisionEncoder`) and MobileSAM's TinyViT, on the targets of
`config.LORA_TARGETS`:

* `qkv`: the attention's input projection; `proj`: its output projection;
* `mlp`: the MLP's two linear layers (`lin1`/`lin2` in the ViT, `fc1`/`fc2` in TinyViT).

TinyViT's first stage is convolutional and gets none.

Each adapter is named by its base kernel (`encoders.weight_names`): the ViT's
`layers_._0/attn/qkv/kernel`, TinyViT's `layers.1.blocks.0.attn.qkv.weight`.
`merged_deltas` gives `(alpha / r) A B` per name in Keras layout, which added to the
base kernel is the merged weight an exported model carries (no adapter code needed to
load it); `save_adapter` / `load_adapter` write and read the adapters alone, as PEFT
does (`adapter_model.npz` + `adapter_config.json`).
"""

import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam import fileio
from tff_sam.models import encoders
from tff_sam.models import sam as sam_lib

ADAPTER_WEIGHTS = "adapter_model.npz"
ADAPTER_CONFIG = "adapter_config.json"
_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Where LoRA goes and how large it is.

  Attributes:
    rank: r, the inner dimension of `A` and `B`.
    alpha: The update is scaled by `alpha / rank`.
    targets: Linear layers of every transformer block (`config.LORA_TARGETS`).
  """

  rank: int = 4
  alpha: float = 4.0
  targets: tuple[str, ...] = ("qkv",)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def to_dict(self) -> dict:
    return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def spec_from_config(config: config_lib.RunConfig) -> Optional[LoraSpec]:
  """The run's `LoraSpec`, or None without `--adapter=lora`."""
  if config.adapter != config_lib.LORA_ADAPTER:
    return None
  return LoraSpec(rank=config.lora_rank, alpha=config.lora_alpha,
                  targets=tuple(config.lora_targets))


class LoraDelta(tf.keras.layers.Layer):
  """`scale * (x @ A) @ B`: a linear layer's low-rank update (B starts at zero)."""

  def __init__(self, d_in: int, d_out: int, *, rank: int, scale: float, **kwargs):
    super().__init__(**kwargs)
    self.scale = float(scale)
    bound = 1.0 / np.sqrt(d_in)  # PEFT's default for A (Kaiming-uniform, a = sqrt(5)).
    self.lora_a = self.add_weight(
        name="lora_A", shape=(d_in, rank), dtype=tf.float32,
        initializer=tf.keras.initializers.RandomUniform(-bound, bound), trainable=True)
    self.lora_b = self.add_weight(name="lora_B", shape=(rank, d_out), dtype=tf.float32,
                                  initializer="zeros", trainable=True)
    self.built = True

  def call(self, x: tf.Tensor) -> tf.Tensor:
    return tf.matmul(tf.matmul(x, self.lora_a), self.lora_b) * self.scale

  def delta(self) -> np.ndarray:
    """`scale * A @ B` (d_in, d_out), what merging adds to the base kernel."""
    return (self.scale * (self.lora_a.numpy().astype(np.float64)
                          @ self.lora_b.numpy().astype(np.float64))).astype(np.float32)


class LoraDense(tf.keras.layers.Layer):
  """A Keras `Dense` plus its low-rank update (the ViT's linear layers)."""

  def __init__(self, base: tf.keras.layers.Dense, delta: LoraDelta, **kwargs):
    kwargs.setdefault("name", f"{base.name}_lora")
    super().__init__(**kwargs)
    self.base = base
    self.delta = delta
    self.built = True

  def call(self, x: tf.Tensor) -> tf.Tensor:
    return self.base(x) + self.delta(x)


@dataclasses.dataclass(frozen=True)
class Adapter:
  """One adapter: the name of the base kernel it updates, and its layer."""

  name: str
  layer: LoraDelta


def _delta_for(kernel, spec: LoraSpec, name: str) -> LoraDelta:
  d_in, d_out = (int(d) for d in kernel.shape)
  return LoraDelta(d_in, d_out, rank=spec.rank, scale=spec.scale,
                   name=name.replace("/", "_").replace(".", "_") + "_lora")


def add_lora(encoder: tf.keras.layers.Layer, *, kind: str, spec: LoraSpec) -> list[Adapter]:
  """Adds LoRA on `spec.targets` of every transformer block of `encoder`.

  Args:
    encoder: A built encoder of `kind` (`encoders.build_image_encoder`).
    kind: `sam.VIT_ENCODER` or `sam.TINYVIT_ENCODER`.
    spec: Rank, scale and targets.

  Returns:
    The adapters, in the encoder's block order.
  """
  adapters = []
  if kind == sam_lib.TINYVIT_ENCODER:
    for i, stage in enumerate(encoder.stages):
      if i < encoders.first_block_stage(kind):
        continue
      for j, block in enumerate(stage.blocks):
        prefix = f"layers.{i}.blocks.{j}"
        plan = []
        if "qkv" in spec.targets:
          plan.append((block.attn, "qkv", block.attn.qkv_kernel, f"{prefix}.attn.qkv.weight"))
        if "proj" in spec.targets:
          plan.append((block.attn, "proj", block.attn.proj_kernel, f"{prefix}.attn.proj.weight"))
        if "mlp" in spec.targets:
          plan.append((block.mlp, "fc1", block.mlp.fc1_kernel, f"{prefix}.mlp.fc1.weight"))
          plan.append((block.mlp, "fc2", block.mlp.fc2_kernel, f"{prefix}.mlp.fc2.weight"))
        for owner, key, kernel, name in plan:
          delta = _delta_for(kernel, spec, name)
          owner.adapters[key] = delta
          adapters.append(Adapter(name, delta))
    return adapters
  if kind != sam_lib.VIT_ENCODER:
    raise ValueError(f"unknown image encoder {kind!r}")
  for i, layer in enumerate(encoder.layers):
    prefix = f"layers_._{i}"
    plan = []
    if "qkv" in spec.targets:
      plan.append((layer.attn, "qkv", f"{prefix}/attn/qkv/kernel"))
    if "proj" in spec.targets:
      plan.append((layer.attn, "proj", f"{prefix}/attn/proj/kernel"))
    if "mlp" in spec.targets:
      plan.append((layer.mlp, "lin1", f"{prefix}/mlp/lin1/kernel"))
      plan.append((layer.mlp, "lin2", f"{prefix}/mlp/lin2/kernel"))
    for owner, attribute, name in plan:
      base = getattr(owner, attribute)
      delta = _delta_for(base.kernel, spec, name)
      setattr(owner, attribute, LoraDense(base, delta))
      adapters.append(Adapter(name, delta))
  return adapters


def reset_adapters(adapters: Sequence[Adapter], *, seed: int) -> None:
  """Deterministic initial values: A ~ U(+-1/sqrt(d_in)) from `seed`, B = 0."""
  rng = np.random.default_rng([seed, 1_7])
  for adapter in adapters:
    a = adapter.layer.lora_a
    bound = 1.0 / np.sqrt(int(a.shape[0]))
    a.assign(rng.uniform(-bound, bound, size=tuple(a.shape)).astype(np.float32))
    adapter.layer.lora_b.assign(np.zeros(tuple(adapter.layer.lora_b.shape), np.float32))


def merged_deltas(adapters: Sequence[Adapter]) -> dict[str, np.ndarray]:
  """Base kernel name -> `scale * A @ B` (Keras layout), what merging adds."""
  return {a.name: a.layer.delta() for a in adapters}


def count_parameters(adapters: Sequence[Adapter]) -> int:
  return int(sum(np.prod(a.layer.lora_a.shape) + np.prod(a.layer.lora_b.shape)
                 for a in adapters))


def save_adapter(directory: Path, adapters: Sequence[Adapter], *, spec: LoraSpec,
                 image_encoder: str, base_model: str) -> Path:
  """Writes the adapters alone: `adapter_model.npz` and `adapter_config.json`.

  `adapter_model.npz` holds `<base kernel name>.lora_A` (d_in, r) and `.lora_B`
  (r, d_out) in Keras layout (`x @ A @ B`); the update is `scale * A @ B`.
  """
  directory = Path(directory)
  arrays = {}
  for a in adapters:
    arrays[f"{a.name}.lora_A"] = a.layer.lora_a.numpy()
    arrays[f"{a.name}.lora_B"] = a.layer.lora_b.numpy()
  with fileio.atomic_path(directory / ADAPTER_WEIGHTS, suffix=".npz") as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
  fileio.write_json(directory / ADAPTER_CONFIG, {
      "adapter": config_lib.LORA_ADAPTER, "format_version": _FORMAT_VERSION,
      **spec.to_dict(), "scale": spec.scale, "image_encoder": image_encoder,
      "base_model": base_model, "num_adapters": len(adapters),
      "parameters": count_parameters(adapters),
      "note": "LoRA on the image encoder: each base kernel W (Keras layout, d_in x d_out) "
              "becomes W + scale * A @ B. The model folder above holds the merged weights "
              "(no adapter code needed); the mask decoder there is fine-tuned too."})
  return directory


@dataclasses.dataclass(frozen=True)
class LoadedAdapter:
  """Adapters read by `load_adapter`."""

  spec: LoraSpec
  image_encoder: str
  base_model: str
  weights: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (A, B)

  def deltas(self) -> dict[str, np.ndarray]:
    return {name: (self.spec.scale * (a.astype(np.float64) @ b.astype(np.float64))
                   ).astype(np.float32) for name, (a, b) in self.weights.items()}


def load_adapter(directory: Path) -> LoadedAdapter:
  """Reads a folder written by `save_adapter`.

  Raises:
    errors.ModelError: A file is missing, unreadable or inconsistent.
  """
  directory = Path(directory)
  try:
    meta = json.loads((directory / ADAPTER_CONFIG).read_text())
    with np.load(directory / ADAPTER_WEIGHTS, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise errors.ModelError(f"{directory}: cannot read a LoRA adapter ({e})") from None
  if meta.get("adapter") != config_lib.LORA_ADAPTER or meta.get("format_version") != _FORMAT_VERSION:
    raise errors.ModelError(f"{directory / ADAPTER_CONFIG}: not a LoRA adapter of format "
                            f"{_FORMAT_VERSION}")
  names = sorted({k.rsplit(".", 1)[0] for k in arrays})
  weights = {}
  for name in names:
    a, b = arrays.get(f"{name}.lora_A"), arrays.get(f"{name}.lora_B")
    if a is None or b is None or a.shape[1] != b.shape[0]:
      raise errors.ModelError(f"{directory / ADAPTER_WEIGHTS}: {name} lacks a matching "
                              "lora_A/lora_B pair")
    weights[name] = (a, b)
  spec = LoraSpec(rank=int(meta["rank"]), alpha=float(meta["alpha"]),
                  targets=tuple(meta["targets"]))
  return LoadedAdapter(spec=spec, image_encoder=meta["image_encoder"],
                       base_model=meta.get("base_model", ""), weights=weights)
