"""Configurations and names: the frozen, validated objects built once from flags.

The binaries in `tff_sam.experiments` copy their absl flags into `RunConfig` (the
training program; the benchmark's is `bench.settings.BenchConfig`) exactly once; everything
downstream takes the config (or explicit keyword arguments), never flags.
`validate()` raises `errors.ConfigError` naming the offending flag. A run's config is
saved as JSON next to its results (`summary.json` and `config.json`).

This module is also the one place for the names users type: prompt modes, embedded
datasets, built-in models, losses, optimizers, export formats.
"""

import dataclasses
import json
import re
from typing import Any, Callable, Optional, Sequence

from tff_sam import errors

# Prompt modes: which prompts the model gets (training and evaluation).
BOX_PROMPT = "box"
POINTS_PROMPT = "points"
BOTH_PROMPTS = "both"
# A box or one positive point, drawn at random per object every step (micro-sam's
# mixed prompts: training on clicks does not cost boxes).
MIXED_PROMPT = "mixed"
# micro-sam's iterative prompting in training: each step starts as `mixed` (a box or a
# point per prompt), then `sub_iterations - 1` corrections, each a point sampled where
# the previous mask is wrong, the previous mask fed back.
ITERATIVE_PROMPT = "iterative"
SINGLE_PASS_PROMPTS = (BOX_PROMPT, POINTS_PROMPT, BOTH_PROMPTS, MIXED_PROMPT)
PROMPT_MODES = SINGLE_PASS_PROMPTS + (ITERATIVE_PROMPT,)
# The modes that start each prompt from a box or a point drawn at random.
BOX_OR_POINT_PROMPTS = (MIXED_PROMPT, ITERATIVE_PROMPT)
# Held-out evaluation prompts (`--eval_prompt`), each reported separately: the tight
# box; one positive point (the object's most interior pixel); the box, then
# `eval_corrections` corrective points, each placed where the previous mask was most
# wrong, with the previous mask fed back as SAM's mask prompt (micro-sam's protocol).
BOX_EVAL = "box"
POINT_EVAL = "point"
CORRECTIONS_EVAL = "box_corrections"
# No prompt: SAM's automatic mask generation, scored by mSA/SA50/SA75 only.
AUTOMATIC_EVAL = "automatic"
EVAL_PROMPTS = (BOX_EVAL, POINT_EVAL, CORRECTIONS_EVAL, AUTOMATIC_EVAL)
# Settings held as tuples (JSON lists in `config.json`).
TUPLE_SETTINGS = ("workers", "train_clients", "eval_prompt", "lora_targets", "site_test_clients")
# Embedded datasets (`--data`, used without `--data_dir`).
SAMPLE_DATASET = "sample"
SYNTHETIC_DATASET = "synthetic"
NAMED_DATASETS = (SAMPLE_DATASET, SYNTHETIC_DATASET)
# Built-in model names (`--model`); anything else is a hub id or a directory.
TINY_MODEL = "tiny"
MOBILE_SAM_MODEL = "mobile_sam"
MODEL_HELP = ("mobile_sam (MobileSAM's real pretrained weights; the default), a Hugging Face "
              "hub id (e.g. facebook/sam-vit-base), a directory written by save_pretrained "
              "(e.g. a run's model/), or tiny (a small SAM with random weights, for tests).")
# Adapters in the image encoder (`--adapter`): none (only the mask decoder trains) or
# LoRA, low-rank updates B.A of the encoder's linear layers (`tff_sam.models.lora`),
# trained and communicated with the decoder while the base weights stay on the sites.
NO_ADAPTER = "none"
LORA_ADAPTER = "lora"
ADAPTERS = (NO_ADAPTER, LORA_ADAPTER)
# Where LoRA goes (`--lora_targets`), in every transformer block of the encoder: the
# attention's input projection (qkv), its output projection (proj), the MLP's two
# linear layers (mlp).
LORA_TARGETS = ("qkv", "proj", "mlp")
# The settings of the adapters themselves (meaningful with `adapter=lora` only).
LORA_SETTINGS = ("lora_rank", "lora_alpha", "lora_targets")
# The arms of `compare` (`--arms`; `tff_sam.federated.program.compare`): `local` is every
# site alone.
COMPARE_ARMS = ("zero_shot", "local", "centralized", "federated", "fed_lora")
# Federated algorithms (`--algorithm`): FedAvg, or FedProx (a proximal term
# `proximal_strength / 2 * ||w - w_global||^2` in each client's loss).
FEDAVG = "fedavg"
FEDPROX = "fedprox"
ALGORITHMS = (FEDAVG, FEDPROX)
# Compression of the clients' updates (`--update_compression`): none, or TFF's uniform
# quantization of every tensor to this many bits (`EncodedSumFactory`).
NO_COMPRESSION = "none"
QUANTIZATION_BITS = {"int8": 8, "int4": 4}
UPDATE_COMPRESSIONS = (NO_COMPRESSION, *QUANTIZATION_BITS)
# Differential privacy's settings other than the noise multiplier (meaningful only
# with `dp_noise_multiplier > 0`).
DP_SETTINGS = ("dp_clip_norm", "dp_target_quantile", "dp_delta")
# How clients' updates reach the server (privacy and compression): meaningless for a
# run without a server (`compare`'s zero-shot, local-only and centralized arms).
UPLOAD_SETTINGS = ("dp_noise_multiplier", *DP_SETTINGS, "secure_aggregation",
                   "update_compression")
PARTITIONS = ("iid", "dirichlet")
LOSSES = ("dice_ce", "bce", "focal_dice")
# The server's optimizer of the averaged update (TFF's `tff.learning.optimizers`) and
# the settings each one reads (a setting given for another optimizer is refused).
SERVER_OPTIMIZER_SETTINGS = {
    "sgd": (),
    "sgdm": ("server_momentum",),
    "adam": ("server_beta_1", "server_beta_2", "server_epsilon"),
    "yogi": ("server_beta_1", "server_beta_2", "server_epsilon"),
}
SERVER_OPTIMIZERS = tuple(SERVER_OPTIMIZER_SETTINGS)
CLIENT_OPTIMIZERS = ("adam", "sgd")
# Where TFF runs the rounds (`--execution`): TensorFlow in this process from TFF's
# compiled forms (`federated.tf_execution`; CPU or GPUs; the default) or TFF's C++
# worker (CPU only; what `--workers` run).
CPP_EXECUTION = "cpp"
TF_EXECUTION = "tf"
EXECUTIONS = (CPP_EXECUTION, TF_EXECUTION)
# Export formats (`python -m tff_sam.experiments.export --format`); a run's `model/`
# already holds transformers' TF and PyTorch layouts.
SAM_CHECKPOINT_FORMAT = "sam_checkpoint"
ONNX_FORMAT = "onnx"
SAVED_MODEL_FORMAT = "saved_model"
EXPORT_FORMATS = (SAM_CHECKPOINT_FORMAT, ONNX_FORMAT, SAVED_MODEL_FORMAT)


def split_address(address: str) -> tuple[str, int]:
  """A worker's `host:port` (or `[v6]:port`) as (host, port).

  Raises:
    ValueError: Not `host:port` with a port in 1..65535.
  """
  match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", address.strip())
  if not match or not 1 <= int(match.group(2)) <= 65535:
    raise ValueError(f"{address!r} is not host:port (e.g. 10.0.0.7:8000)")
  return match.group(1).strip("[]"), int(match.group(2))


def validate_workers(workers: tuple[str, ...]) -> None:
  """Validates `--workers`: distinct `host:port` addresses (`split_address`).

  Raises:
    errors.ConfigError: naming the flag.
  """
  for address in workers:
    try:
      split_address(address)
    except ValueError as e:
      raise errors.ConfigError("workers", str(e)) from None
  _require_distinct(workers, "workers")


def default_eval_prompt(prompt: str) -> str:
  """The evaluation prompt matching training prompt mode `prompt` (point for points)."""
  return POINT_EVAL if prompt == POINTS_PROMPT else BOX_EVAL


def headline_metric(eval_prompt: str) -> str:
  """The metric that sums up an evaluation prompt: Dice, or mSA for `automatic` (no Dice)."""
  return "msa" if eval_prompt == AUTOMATIC_EVAL else "dice"


def uses_boxes(prompt: str) -> bool:
  """Whether prompt mode `prompt` gives the model boxes."""
  return prompt in (BOX_PROMPT, BOTH_PROMPTS, *BOX_OR_POINT_PROMPTS)


def uses_points(prompt: str) -> bool:
  """Whether prompt mode `prompt` gives the model points."""
  return prompt in (POINTS_PROMPT, BOTH_PROMPTS, *BOX_OR_POINT_PROMPTS)


def require_at_least(config: Any, minimum: int, flags: Sequence[str]) -> None:
  """Validates that each of `config`'s integer settings `flags` is >= `minimum`."""
  for flag in flags:
    value = getattr(config, flag)
    errors.require(value >= minimum, flag, f"must be >= {minimum}, got {value}")


def _require_distinct(values: tuple[str, ...], flag: str) -> None:
  """Validates that list flag `flag` names no value twice (else names the repeats)."""
  repeated = sorted({v for v in values if values.count(v) > 1})
  errors.require(not repeated, flag, f"lists {', '.join(repeated)} more than once")


def require_choices(values: tuple[str, ...], choices: tuple[str, ...], flag: str,
                     what: str, *, empty_ok: bool = False) -> None:
  """Validates a list flag: each value one of `choices`, none twice, at least one
  unless `empty_ok`.

  Raises:
    errors.ConfigError: naming `flag`.
  """
  errors.require(empty_ok or bool(values), flag, f"must list at least one {what} of {choices}")
  for value in values:
    errors.require(value in choices, flag, f"must list {what}s of {choices}, got {value!r}")
  _require_distinct(values, flag)


@dataclasses.dataclass(frozen=True)
class AutomaticSettings:
  """How masks are proposed and filtered (SAM's defaults).

  Attributes:
    points_per_side: The grid has points_per_side² points per crop.
    points_per_batch: Points per decoder call.
    pred_iou_thresh: Keep masks whose predicted IoU is at least this.
    stability_score_thresh: Keep masks whose stability score is at least this.
    stability_score_offset: The logit offset of the stability score.
    box_nms_thresh: Box IoU above which the lower-scored of two masks is dropped.
    crop_n_layers: Layers of crops: layer i splits the image into (2**i)² crops.
    crop_nms_thresh: `box_nms_thresh` between masks of different crops.
    crop_overlap_ratio: Overlap of neighbouring crops, a share of the image's side.
    crop_n_points_downscale_factor: Layer i has points_per_side / factor**i per side.
    min_mask_region_area: Remove islands and holes smaller than this (pixels; 0 = off).
    max_mask_fraction: Drop masks covering more than this share of the image: SAM
      segments the background of microscopy images as one more object (micro-sam
      takes the largest object for background; this drops only one that large).
      1.0 keeps every mask.
  """

  points_per_side: int = 32
  points_per_batch: int = 64
  pred_iou_thresh: float = 0.88
  stability_score_thresh: float = 0.95
  stability_score_offset: float = 1.0
  box_nms_thresh: float = 0.7
  crop_n_layers: int = 0
  crop_nms_thresh: float = 0.7
  crop_overlap_ratio: float = 512 / 1500
  crop_n_points_downscale_factor: int = 1
  min_mask_region_area: int = 0
  max_mask_fraction: float = 0.5

  def validate(self) -> "AutomaticSettings":
    """Returns self, or raises `errors.ConfigError` naming the first bad setting."""
    for name in ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor"):
      errors.require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
    for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh",
                 "crop_nms_thresh"):
      value = getattr(self, name)
      errors.require(0.0 <= value <= 1.0, name, f"must be in [0, 1], got {value}")
    errors.require(0.0 < self.max_mask_fraction <= 1.0, "max_mask_fraction",
                   f"must be in (0, 1], got {self.max_mask_fraction}")
    errors.require(0.0 <= self.crop_overlap_ratio < 1.0, "crop_overlap_ratio",
                   f"must be in [0, 1), got {self.crop_overlap_ratio}")
    for name in ("crop_n_layers", "min_mask_region_area"):
      errors.require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
    errors.require(self.stability_score_offset > 0, "stability_score_offset",
                   f"must be > 0, got {self.stability_score_offset}")
    return self


# The automatic segmentation settings a run's `--eval_prompt=automatic` takes, as
# `segment` and `evaluate` take them (`AutomaticSettings`; the same flags).
AUTOMATIC_SETTINGS = ("points_per_side", "points_per_batch", "pred_iou_thresh",
                      "stability_score_thresh", "box_nms_thresh", "crop_n_layers",
                      "min_mask_region_area", "max_mask_fraction")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that defines a federated fine-tuning run.

  Attributes mirror the flags of `python -m tff_sam.experiments.run` one to one; see
  `--help` there for user-facing descriptions.
  """

  output_dir: str
  # Data: `data_dir`, or else the named embedded dataset `data`.
  data_dir: Optional[str] = None
  data: str = SAMPLE_DATASET
  partition: str = "iid"
  num_clients: int = 4
  dirichlet_alpha: float = 0.5
  test_fraction: float = 0.2
  # Share of every training client's images held out of training for model selection
  # (federated evaluation every `eval_every` rounds; `keep_best` chooses on it); 0 = none.
  validation_fraction: float = 0.0
  # Labelled training images kept per client, the same in every run (0 = all).
  labels_per_site: int = 0
  binary_components: bool = False
  skip_bad_examples: bool = False
  # Which training clients take part (empty = all), and whether their images are
  # pooled into one client (`discovery.POOLED_CLIENT`): the local-only and centralized arms
  # of `tff_sam.experiments.compare`.
  train_clients: tuple[str, ...] = ()
  pool_clients: bool = False
  # Prompts.
  prompt: str = BOX_PROMPT
  box_jitter: float = 20.0
  box_jitter_fraction: float = 0.1
  num_points: int = 1
  num_negative_points: int = 0
  prompts_per_image: int = 4
  # Decoder passes per step with `--prompt=iterative` (the first prompt, then corrections).
  sub_iterations: int = 3
  # Model.
  model: str = MOBILE_SAM_MODEL
  train_iou_head: bool = True
  cache_dir: Optional[str] = None
  encode_batch_size: int = 4
  # False = online mode: clients hold images, the TFF model runs the frozen encoder.
  # With an adapter, True caches the encoder's activations up to the first adapted
  # block instead of its embeddings (those change as the adapters train).
  embedding_cache: bool = True
  # Adapters in the image encoder (`ADAPTERS`): LoRA of rank `lora_rank`, scale
  # `lora_alpha / lora_rank`, on the `lora_targets` of every transformer block.
  adapter: str = NO_ADAPTER
  lora_rank: int = 4
  lora_alpha: float = 4.0
  lora_targets: tuple[str, ...] = ("qkv",)
  # Federated optimization.
  rounds: int = 10
  clients_per_round: int = 2
  # 0 = a round's clients run at once; N = in sequential groups of N whose partial
  # aggregates are merged (TFF's mergeable execution): bounds the round's memory.
  clients_per_subround: int = 0
  local_epochs: int = 1
  batch_size: int = 2
  client_optimizer: str = "adam"
  client_lr: float = 1e-5
  server_optimizer: str = "sgd"
  server_lr: float = 1.0
  # `sgdm`'s momentum; `adam`'s and `yogi`'s decay rates and epsilon (1e-3, the
  # adaptivity of "Adaptive Federated Optimization", not Keras' 1e-7).
  server_momentum: float = 0.9
  server_beta_1: float = 0.9
  server_beta_2: float = 0.99
  server_epsilon: float = 1e-3
  loss: str = "dice_ce"
  # Robust aggregation (see `tff_sam.federated`).
  zeroing: bool = True
  zeroing_quantile: float = 0.98
  zeroing_multiplier: float = 2.0
  clipping: bool = True
  clipping_quantile: float = 0.8
  clipping_initial_norm: float = 1.0
  # Privacy and communication (`tff_sam.federated.learning.privacy`, `aggregation`).
  algorithm: str = FEDAVG
  proximal_strength: float = 0.0
  # Client-level differential privacy: Gaussian noise of `dp_noise_multiplier` x the
  # clipping norm on the sum of clipped updates (0 = off); clipping fixed at
  # `dp_clip_norm` (> 0) or adaptive, tracking `dp_target_quantile`; epsilon at
  # `dp_delta` (0 = 1 / N^1.1 for N clients).
  dp_noise_multiplier: float = 0.0
  dp_clip_norm: float = 0.0
  dp_target_quantile: float = 0.5
  dp_delta: float = 0.0
  # Sum the updates with TFF's secure aggregation (`SecureSumFactory`).
  secure_aggregation: bool = False
  update_compression: str = NO_COMPRESSION
  # Execution: where TFF runs the computations (`EXECUTIONS`).
  execution: str = TF_EXECUTION
  # `host:port` of TFF workers on other machines (`python -m tff_sam.experiments.worker`);
  # empty = the local worker. A round's clients are spread over them (cpp only).
  workers: tuple[str, ...] = ()
  # Seconds a worker may stay unreachable before the run ends with an error.
  worker_timeout: float = 120.0
  # Evaluation.
  eval_every: int = 1
  eval_max_objects: int = 0
  # `EVAL_PROMPTS` evaluated on the final model (empty = `default_eval_prompt(prompt)`);
  # the first is also the per-round held-out evaluation.
  eval_prompt: tuple[str, ...] = ()
  eval_corrections: int = 3
  # `--eval_prompt=automatic`'s settings (`AUTOMATIC_SETTINGS`; SAM's defaults).
  points_per_side: int = AutomaticSettings.points_per_side
  points_per_batch: int = AutomaticSettings.points_per_batch
  pred_iou_thresh: float = AutomaticSettings.pred_iou_thresh
  stability_score_thresh: float = AutomaticSettings.stability_score_thresh
  box_nms_thresh: float = AutomaticSettings.box_nms_thresh
  crop_n_layers: int = AutomaticSettings.crop_n_layers
  min_mask_region_area: int = AutomaticSettings.min_mask_region_area
  max_mask_fraction: float = AutomaticSettings.max_mask_fraction
  # Export the round with the best validation Dice (without validation: test Dice).
  keep_best: bool = False
  # With validation (`--validation_fraction` or a val/ folder), also score the test set
  # at every evaluation round (not only 0 and last).
  test_every_eval: bool = False
  # Personalization (`federated.program.personalization`): local steps per site from the
  # exported model (0 = none); `site_test_clients`: "site:client" scoring pairs.
  personalize_steps: int = 0
  site_test_clients: tuple[str, ...] = ()
  seed: int = 0

  @property
  def eval_prompt_list(self) -> tuple[str, ...]:
    """The evaluation prompts, `eval_prompt` or the training prompt's default."""
    return self.eval_prompt or (default_eval_prompt(self.prompt),)

  @property
  def automatic_settings(self) -> AutomaticSettings:
    """The settings of `--eval_prompt=automatic`."""
    return AutomaticSettings(**{name: getattr(self, name) for name in AUTOMATIC_SETTINGS})

  @property
  def num_subrounds(self) -> int:
    """Client groups per round (1 = all clients at once), at least one per worker."""
    groups = (-(-self.clients_per_round // self.clients_per_subround)
              if self.clients_per_subround else 1)
    return max(groups, len(self.workers))

  def validate(self) -> "RunConfig":
    """Checks every field; returns self so it can be chained.

    Raises:
      errors.ConfigError: naming the first invalid flag.
    """
    errors.require(bool(self.output_dir), "output_dir", "must be set")
    require_at_least(self, 1, ("num_clients", "num_points", "prompts_per_image",
                                "encode_batch_size", "clients_per_round", "local_epochs",
                                "batch_size", "eval_every"))
    require_at_least(self, 0, ("num_negative_points", "rounds", "seed", "personalize_steps",
                                "labels_per_site"))
    errors.require(self.data in NAMED_DATASETS, "data", f"must be one of {NAMED_DATASETS}, got {self.data!r}")
    errors.require(self.partition in PARTITIONS, "partition", f"must be one of {PARTITIONS}, got {self.partition!r}")
    errors.require(self.dirichlet_alpha > 0, "dirichlet_alpha", f"must be > 0, got {self.dirichlet_alpha}")
    errors.require(0.0 <= self.test_fraction < 1.0, "test_fraction", f"must be in [0, 1), got {self.test_fraction}")
    errors.require(self.prompt in PROMPT_MODES, "prompt", f"must be one of {PROMPT_MODES}, got {self.prompt!r}")
    errors.require(self.box_jitter >= 0, "box_jitter", f"must be >= 0 pixels, got {self.box_jitter}")
    errors.require(self.box_jitter_fraction >= 0, "box_jitter_fraction",
                   f"must be >= 0, got {self.box_jitter_fraction}")
    errors.require(self.sub_iterations >= 2, "sub_iterations",
                   f"must be >= 2 (the first prompt and at least one correction), got "
                   f"{self.sub_iterations}")
    errors.require(bool(self.model), "model", "must be set (mobile_sam, a hub id or a local directory)")
    self._validate_adapter()
    self._validate_privacy()
    errors.require(self.clients_per_subround >= 0, "clients_per_subround",
                   f"must be >= 0 (0 = all at once), got {self.clients_per_subround}")
    errors.require(self.client_optimizer in CLIENT_OPTIMIZERS, "client_optimizer",
                   f"must be one of {CLIENT_OPTIMIZERS}, got {self.client_optimizer!r}")
    errors.require(self.client_lr > 0, "client_lr", f"must be > 0, got {self.client_lr}")
    errors.require(self.execution in EXECUTIONS, "execution",
                   f"must be one of {EXECUTIONS}, got {self.execution!r}")
    validate_workers(self.workers)
    errors.require(self.worker_timeout >= 2, "worker_timeout",
                   f"must be >= 2 seconds, got {self.worker_timeout:g}")
    errors.require(not self.workers or self.execution == CPP_EXECUTION, "workers",
                   "runs the rounds on TFF's C++ workers; it cannot be combined with "
                   f"--execution={self.execution} (drop one)")
    self._validate_server_optimizer()
    errors.require(self.loss in LOSSES, "loss", f"must be one of {LOSSES}, got {self.loss!r}")
    for flag in ("zeroing_quantile", "clipping_quantile"):
      value = getattr(self, flag)
      errors.require(0.0 < value < 1.0, flag, f"must be in (0, 1), got {value}")
    errors.require(self.zeroing_multiplier > 0, "zeroing_multiplier",
                   f"must be > 0, got {self.zeroing_multiplier}")
    errors.require(self.clipping_initial_norm > 0, "clipping_initial_norm",
                   f"must be > 0, got {self.clipping_initial_norm}")
    self._validate_personalization()
    errors.require(0.0 <= self.validation_fraction < 1.0, "validation_fraction",
                   f"must be in [0, 1), got {self.validation_fraction}")
    errors.require(self.eval_max_objects >= 0, "eval_max_objects",
                   f"must be >= 0 (0 = all objects), got {self.eval_max_objects}")
    require_choices(self.eval_prompt, EVAL_PROMPTS, "eval_prompt", "prompt",
                     empty_ok=True)  # Empty: the training prompt's default.
    errors.require(tuple(self.eval_prompt[:1]) != (AUTOMATIC_EVAL,), "eval_prompt", "automatic "
                   "cannot come first: the first is every round's evaluation, by Dice")
    errors.require(self.eval_corrections >= 1, "eval_corrections",
                   f"must be >= 1 corrective points, got {self.eval_corrections}")
    self.automatic_settings.validate()
    if AUTOMATIC_EVAL not in self.eval_prompt:
      self._require_unset(AUTOMATIC_SETTINGS, lambda flag: "is set but nothing is segmented "
                          f"automatically; add {AUTOMATIC_EVAL} to --eval_prompt or drop --{flag}")
    _require_distinct(self.train_clients, "train_clients")
    errors.require(not self.pool_clients or self.clients_per_round == 1, "clients_per_round",
                   f"must be 1 with --pool_clients (one pooled client), got {self.clients_per_round}")
    return self

  @property
  def differential_privacy(self) -> bool:
    return self.dp_noise_multiplier > 0

  def _validate_privacy(self) -> None:
    errors.require(self.algorithm in ALGORITHMS, "algorithm",
                   f"must be one of {ALGORITHMS}, got {self.algorithm!r}")
    errors.require(self.proximal_strength >= 0, "proximal_strength",
                   f"must be >= 0, got {self.proximal_strength:g}")
    errors.require(self.algorithm == FEDPROX or self.proximal_strength == 0,
                   "proximal_strength", f"is set but --algorithm={self.algorithm}; add "
                   f"--algorithm={FEDPROX} (or drop --proximal_strength)")
    errors.require(self.dp_noise_multiplier >= 0, "dp_noise_multiplier",
                   f"must be >= 0 (0 = no differential privacy), got {self.dp_noise_multiplier:g}")
    errors.require(self.dp_clip_norm >= 0, "dp_clip_norm",
                   f"must be >= 0 (0 = adaptive clipping), got {self.dp_clip_norm:g}")
    errors.require(0 < self.dp_target_quantile < 1, "dp_target_quantile",
                   f"must be in (0, 1), got {self.dp_target_quantile:g}")
    errors.require(0 <= self.dp_delta < 1, "dp_delta",
                   f"must be in [0, 1) (0 = 1 / N^1.1), got {self.dp_delta:g}")
    if not self.differential_privacy:
      self._require_unset(DP_SETTINGS, lambda flag: "is set but differential privacy is off; "
                          f"add --dp_noise_multiplier=Z (Z > 0) or drop --{flag}")
    errors.require(self.update_compression in UPDATE_COMPRESSIONS, "update_compression",
                   f"must be one of {UPDATE_COMPRESSIONS}, got {self.update_compression!r}")
    errors.require(not (self.secure_aggregation and self.differential_privacy),
                   "secure_aggregation", "cannot be combined with --dp_noise_multiplier "
                   "here: central DP adds its noise to the sum the server sees (TFF's "
                   "distributed DP, ddp_secure_aggregator, is the combination; not built)")
    errors.require(self.update_compression == NO_COMPRESSION or not self.secure_aggregation,
                   "update_compression", "cannot be combined with --secure_aggregation (the "
                   "secure sum quantizes the updates itself)")
    errors.require(self.update_compression == NO_COMPRESSION or not self.differential_privacy,
                   "update_compression", "cannot be combined with --dp_noise_multiplier here "
                   "(the DP sum is of float clipped updates; compressing them is not built)")

  def _require_unset(self, flags: Sequence[str], why: Callable[[str], str]) -> None:
    """Refuses each of `flags` set off its default where it has no effect (`why(flag)`)."""
    defaults = {f.name: f.default for f in dataclasses.fields(self)}
    for flag in flags:
      errors.require(getattr(self, flag) == defaults[flag], flag, why(flag))

  def _validate_personalization(self) -> None:
    if not self.personalize_steps:
      self._require_unset(("site_test_clients",), lambda _: "is set but nothing is "
                          "personalized; add --personalize_steps=N or drop it")
    else:
      errors.require(self.adapter == NO_ADAPTER and self.embedding_cache, "personalize_steps",
                     "personalizes the mask decoder on cached embeddings; it cannot be "
                     "combined with --adapter=lora or --noembedding_cache (drop one)")
    for entry in self.site_test_clients:
      errors.require(len(entry.split(":")) == 2 and all(entry.split(":")), "site_test_clients",
                     f"entries are site:client (a training site and the held-out client its "
                     f"personalized model is scored on), got {entry!r}")
    _require_distinct(tuple(e.split(":")[0] for e in self.site_test_clients),
                      "site_test_clients")

  def _validate_server_optimizer(self) -> None:
    errors.require(self.server_optimizer in SERVER_OPTIMIZERS, "server_optimizer",
                   f"must be one of {SERVER_OPTIMIZERS}, got {self.server_optimizer!r}")
    errors.require(self.server_lr > 0, "server_lr", f"must be > 0, got {self.server_lr}")
    used = SERVER_OPTIMIZER_SETTINGS[self.server_optimizer]
    self._require_unset(
        sorted({f for fs in SERVER_OPTIMIZER_SETTINGS.values() for f in fs} - set(used)),
        lambda flag: f"is set but --server_optimizer={self.server_optimizer} does not use it; "
        "drop it or pass --server_optimizer="
        + " or ".join(n for n, fs in SERVER_OPTIMIZER_SETTINGS.items() if flag in fs))
    for flag in ("server_momentum", "server_beta_1", "server_beta_2"):
      errors.require(0.0 <= getattr(self, flag) < 1.0, flag, f"must be in [0, 1), got {getattr(self, flag)}")
    errors.require(self.server_epsilon > 0, "server_epsilon", f"must be > 0, got {self.server_epsilon}")

  def _validate_adapter(self) -> None:
    errors.require(self.adapter in ADAPTERS, "adapter",
                   f"must be one of {ADAPTERS}, got {self.adapter!r}")
    if self.adapter == NO_ADAPTER:
      self._require_unset(LORA_SETTINGS, lambda flag: "is set but there is no adapter; add "
                          f"--adapter={LORA_ADAPTER} (or drop --{flag})")
      return
    errors.require(self.lora_rank >= 1, "lora_rank", f"must be >= 1, got {self.lora_rank}")
    errors.require(self.lora_alpha > 0, "lora_alpha", f"must be > 0, got {self.lora_alpha}")
    require_choices(self.lora_targets, LORA_TARGETS, "lora_targets", "target")

  def to_dict(self) -> dict[str, Any]:
    """The settings as JSON values (tuples as lists), as `config.json` holds them."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def saved_settings(cls, values: dict[str, Any]) -> dict[str, Any]:
    """A saved config's settings (`to_dict` form), those it predates at their defaults."""
    return {**cls(output_dir="").to_dict(), **values}

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise errors.ConfigError(unknown[0], "is not a known setting")
    values = {k: tuple(v) if k in TUPLE_SETTINGS and isinstance(v, list) else v
              for k, v in values.items()}  # JSON lists.
    return cls(**values)
