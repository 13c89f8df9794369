r"""Federated fine-tuning of SAM's mask decoder (and LoRA adapters) with TFF (the main job).

  python -m tff_sam.experiments.run --rounds 10 --output_dir runs/mine \
      [--data_dir DIR] [--model mobile_sam|facebook/sam-vit-base|DIR] [--flagfile F] \
      [--workers host:port,...]

Without --data_dir it runs on the embedded default dataset. Flags are copied once
into a validated `RunConfig`; user mistakes end with one `error:` line and exit 1.
"""

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF and TFF's C++ worker: errors only.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # No TF-deprecation banner.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam import runtime
from tff_sam.experiments import automatic_flags  # pylint: disable=unused-import  (its flags are run's)

# Defaults live in one place: the dataclass.
_F = {f.name: f.default for f in dataclasses.fields(config_lib.RunConfig)}

# Data.
flags.DEFINE_string("data_dir", None, "Folder with images/ + masks/ (or one sub-folder per "
                    "site, each a client; optional test/). Default: the --data dataset.")
flags.DEFINE_enum("data", _F["data"], config_lib.NAMED_DATASETS,
                  "Embedded dataset used when --data_dir is not given: sample = real "
                  "microscopy (HeLa nuclei + bacteria, 4 sites), synthetic = generated shapes.")
flags.DEFINE_enum("partition", _F["partition"], config_lib.PARTITIONS,
                  "How a flat data_dir is split into clients.")
flags.DEFINE_integer("num_clients", _F["num_clients"], "Clients for a flat data_dir.")
flags.DEFINE_float("dirichlet_alpha", _F["dirichlet_alpha"],
                   "Dirichlet concentration for --partition=dirichlet (smaller = more skewed).")
flags.DEFINE_float("test_fraction", _F["test_fraction"],
                   "Fraction of images held out for testing when there is no test/ folder.")
flags.DEFINE_float("validation_fraction", _F["validation_fraction"],
                   "Share of every training site's images held out of training for model "
                   "selection: scored by federated evaluation every --eval_every rounds "
                   "(val_dice), and what --keep_best chooses on. 0 = no validation, or the "
                   "data's own val/ folder when it has one (val/<site>/images + masks).")
flags.DEFINE_string("labels_per_site", "all",
                   "Labelled training images kept per site (a number, or all), the same "
                   "images whatever else changes (chosen by --seed); the label-scarcity "
                   "setting. compare takes a list (e.g. 1,2,4,all) and draws the curve.")
flags.DEFINE_boolean("binary_components", _F["binary_components"],
                     "Binary masks: one object per connected component instead of one object.")
flags.DEFINE_boolean("skip_bad_examples", _F["skip_bad_examples"],
                     "Skip unreadable/unpaired/mismatched files with a warning (counted in "
                     "summary.json) instead of stopping with an error.")
flags.DEFINE_list("train_clients", [], "Train on these clients only (names as in clients/; "
                  "default all). The held-out data is the same whatever is chosen.")
flags.DEFINE_boolean("pool_clients", _F["pool_clients"],
                     "Put every training image into one client (centralized training through "
                     "the same process; needs --clients_per_round=1).")
# Prompts.
flags.DEFINE_enum("prompt", _F["prompt"], config_lib.PROMPT_MODES,
                  "Prompt type for training: box, points, both, mixed (a box or a point "
                  "at random per object every step), or iterative (mixed, then "
                  "corrective points: micro-sam's iterative prompting, --sub_iterations).")
flags.DEFINE_float("box_jitter", _F["box_jitter"],
                   "Max random shift of each box coordinate, in pixels of SAM's 1024 frame.")
flags.DEFINE_float("box_jitter_fraction", _F["box_jitter_fraction"],
                   "Box noise std as a fraction of the box side, clipped to --box_jitter (SAM's "
                   "recipe: 0.1); 0 = uniform noise up to --box_jitter.")
flags.DEFINE_integer("num_points", _F["num_points"], "Positive points per prompt.")
flags.DEFINE_integer("num_negative_points", _F["num_negative_points"], "Negative points per prompt.")
flags.DEFINE_integer("sub_iterations", _F["sub_iterations"],
                     "--prompt=iterative: decoder passes per training step (micro-sam's "
                     "iterative prompting: a box or a point, then a corrective point sampled "
                     "where the mask is wrong per further pass, the previous mask fed back).")
flags.DEFINE_integer("prompts_per_image", _F["prompts_per_image"],
                     "Objects sampled per image per local epoch.")
# Model.
flags.DEFINE_string("model", _F["model"], config_lib.MODEL_HELP)
flags.DEFINE_boolean("train_iou_head", _F["train_iou_head"],
                     "Train the IoU head (MSE to the predicted mask's IoU); else freeze it.")
flags.DEFINE_string("cache_dir", None, "Cache for embeddings, data and converted weights "
                    "(default $TFF_SAM_CACHE or ~/.cache/tff_sam).")
flags.DEFINE_integer("encode_batch_size", _F["encode_batch_size"], "Images per encoder call.")
flags.DEFINE_boolean("embedding_cache", _F["embedding_cache"],
                     "Train on cached image embeddings (the encoder runs once per image). "
                     "--noembedding_cache = online mode: clients hold preprocessed images and "
                     "the TFF model runs the frozen image encoder at every step, as the "
                     "published recipes do (much slower; a baseline).")
flags.DEFINE_enum("adapter", _F["adapter"], config_lib.ADAPTERS,
                  "Adapters in the image encoder: none (only the mask decoder trains) or lora "
                  "(low-rank updates of the encoder's linear layers, trained and sent with the "
                  "decoder; the encoder's base weights stay on the sites). With "
                  "--embedding_cache the cache holds the encoder's activations where its first "
                  "adapted stage starts; --noembedding_cache runs the whole encoder.")
flags.DEFINE_integer("lora_rank", _F["lora_rank"], "--adapter=lora: rank r of each update B.A.")
flags.DEFINE_float("lora_alpha", _F["lora_alpha"],
                   "--adapter=lora: each update is scaled by lora_alpha / lora_rank. With Adam "
                   "(the default client optimizer) B moves about --client_lr per step whatever "
                   "the scale, so this scale is the adapters' learning rate relative to the "
                   "decoder's (docs/lora.md).")
flags.DEFINE_list("lora_targets", list(_F["lora_targets"]),
                  "--adapter=lora: linear layers of every transformer block that get an "
                  "adapter: qkv (attention input projection), proj (attention output "
                  "projection), mlp (the MLP's two layers).")
# Federated optimization.
flags.DEFINE_integer("rounds", _F["rounds"], "Federated rounds.")
flags.DEFINE_integer("clients_per_round", _F["clients_per_round"], "Clients sampled per round.")
flags.DEFINE_integer("clients_per_subround", _F["clients_per_subround"],
                     "Run a round's clients in sequential groups of this many, merging their "
                     "partial aggregates (TFF's mergeable execution), so memory grows with the "
                     "group, not the round; 0 = all at once.")
flags.DEFINE_integer("local_epochs", _F["local_epochs"], "Local epochs per round.")
flags.DEFINE_integer("batch_size", _F["batch_size"], "Images per local batch.")
flags.DEFINE_enum("client_optimizer", _F["client_optimizer"], config_lib.CLIENT_OPTIMIZERS,
                  "Optimizer of the clients' local steps (sgd = plain, no momentum).")
flags.DEFINE_float("client_lr", _F["client_lr"], "Client learning rate.")
flags.DEFINE_enum("server_optimizer", _F["server_optimizer"], config_lib.SERVER_OPTIMIZERS,
                  "Server optimizer applied to the averaged update (TFF's own): sgd (FedAvg "
                  "with --server_lr=1), sgdm (with --server_momentum), adam or yogi (FedAdam, "
                  "FedYogi: --server_beta_1, --server_beta_2, --server_epsilon).")
flags.DEFINE_float("server_lr", _F["server_lr"], "Server learning rate.")
flags.DEFINE_float("server_momentum", _F["server_momentum"], "--server_optimizer=sgdm: momentum.")
flags.DEFINE_float("server_beta_1", _F["server_beta_1"],
                   "--server_optimizer=adam|yogi: decay rate of the first moment.")
flags.DEFINE_float("server_beta_2", _F["server_beta_2"],
                   "--server_optimizer=adam|yogi: decay rate of the second moment.")
flags.DEFINE_float("server_epsilon", _F["server_epsilon"],
                   "--server_optimizer=adam|yogi: epsilon, the degree of adaptivity (1e-3 as "
                   "in 'Adaptive Federated Optimization'; smaller is more adaptive).")
flags.DEFINE_enum("loss", _F["loss"], config_lib.LOSSES, "Mask loss.")
# Robust aggregation.
flags.DEFINE_boolean("zeroing", _F["zeroing"],
                     "Zero out client updates whose largest absolute value exceeds an adaptive "
                     "threshold (--nozeroing disables).")
flags.DEFINE_float("zeroing_quantile", _F["zeroing_quantile"],
                   "Quantile of clients' max-abs update values the zeroing threshold tracks.")
flags.DEFINE_float("zeroing_multiplier", _F["zeroing_multiplier"],
                   "Zeroing threshold = multiplier x that quantile + 1.")
flags.DEFINE_boolean("clipping", _F["clipping"],
                     "Clip client updates to an adaptive L2 norm (--noclipping disables).")
flags.DEFINE_float("clipping_quantile", _F["clipping_quantile"],
                   "Quantile of clients' update L2 norms the clipping norm tracks.")
flags.DEFINE_float("clipping_initial_norm", _F["clipping_initial_norm"],
                   "Starting L2 clipping norm.")
# Privacy and communication.
flags.DEFINE_enum("algorithm", _F["algorithm"], config_lib.ALGORITHMS,
                  "fedavg, or fedprox: each client's loss gains --proximal_strength / 2 x the "
                  "squared distance of its weights to the round's global model.")
flags.DEFINE_float("proximal_strength", _F["proximal_strength"],
                   "--algorithm=fedprox: the proximal term's strength mu (>= 0; 0 = FedAvg).")
flags.DEFINE_float("dp_noise_multiplier", _F["dp_noise_multiplier"],
                   "Client-level differential privacy (DP-FedAvg, TFF's "
                   "DifferentiallyPrivateFactory): Gaussian noise of this many clipping norms "
                   "on the sum of the clipped updates; every client counts once. 0 = off. The "
                   "epsilon spent is reported every round (dp_epsilon).")
flags.DEFINE_float("dp_clip_norm", _F["dp_clip_norm"],
                   "DP: fixed L2 clipping norm of each client's update; 0 = adaptive clipping "
                   "(tracks --dp_target_quantile, starting at --clipping_initial_norm).")
flags.DEFINE_float("dp_target_quantile", _F["dp_target_quantile"],
                   "DP with adaptive clipping: the quantile of the clients' update norms the "
                   "clipping norm tracks.")
flags.DEFINE_float("dp_delta", _F["dp_delta"],
                   "DP: the delta of the reported (epsilon, delta); 0 = 1 / N^1.1 for N clients.")
flags.DEFINE_boolean("secure_aggregation", _F["secure_aggregation"],
                     "Sum the clients' updates with TFF's secure aggregation (SecureSumFactory: "
                     "values bounded and quantized to integers, summed so the server only sees "
                     "the total). TFF has no cryptographic protocol in any runtime: both "
                     "executions run TFF's own simulation of it.")
flags.DEFINE_enum("update_compression", _F["update_compression"], config_lib.UPDATE_COMPRESSIONS,
                  "Compress the clients' uploads: none, or int8 / int4 (TFF's uniform "
                  "quantization of every tensor of the update to 8 / 4 bits, stochastic "
                  "rounding, bit-packed: 1.14 / 0.57 bytes per value instead of 4).")
# Execution.
flags.DEFINE_enum("execution", "auto", ("auto",) + config_lib.EXECUTIONS,
                  "Where TFF runs the rounds: tf = TFF's compiled rounds run by TensorFlow in "
                  "this process, on the GPU(s) it sees, else the CPU; cpp = TFF's C++ "
                  "worker_binary (CPU only); auto = cpp with --workers, else tf. A run may be "
                  "resumed with the other execution.")
flags.DEFINE_list("workers", [], "host:port,... of TFF workers on other machines (start each "
                  "with python -m tff_sam.experiments.worker --port P): each round's clients "
                  "are split over them and run in parallel (TFF's mergeable execution; "
                  "docs/execution.md, 'Several machines'). Empty = TFF's local worker.")
flags.DEFINE_float("worker_timeout", _F["worker_timeout"],
                   "Seconds a --workers worker may stay unreachable before the run ends with "
                   "an error naming it (the same command resumes).")
# Evaluation.
flags.DEFINE_integer("eval_every", _F["eval_every"], "Evaluate on the held-out data (central "
                     "test split and federated evaluation on held-out clients) every N rounds.")
flags.DEFINE_integer("eval_max_objects", _F["eval_max_objects"],
                     "Evaluate at most this many objects per test image (0 = all).")
flags.DEFINE_list("eval_prompt", [], "Held-out evaluation prompts, each reported "
                  "separately for the exported model (summary.json 'evaluation'): box (the tight "
                  "box), point (one positive point, the object's most interior pixel), "
                  "box_corrections (the box, then --eval_corrections corrective points where "
                  "the mask is most wrong, the previous mask fed back), automatic (no prompt: "
                  "SAM's automatic mask generation, mSA/SA50/SA75 only; not first). The first "
                  "is also the per-round evaluation. Default: point for --prompt=points, "
                  "else box.")
flags.DEFINE_integer("eval_corrections", _F["eval_corrections"],
                     "Corrective points of --eval_prompt=box_corrections.")
flags.DEFINE_boolean("keep_best", _F["keep_best"],
                     "Export the evaluated round with the best validation Dice (round 0, the "
                     "zero-shot model, included) instead of the last round; a guard against "
                     "decoder collapse. Without validation (--validation_fraction or a val/ "
                     "folder) it chooses on the held-out test Dice, so its test score is "
                     "optimistic.")
flags.DEFINE_integer("personalize_steps", _F["personalize_steps"],
                     "After training: fine-tune the exported global model for this many local "
                     "steps on each training site's own images, score each site's model on "
                     "its held-out client and write it to personalized/<site>/ (0 = no "
                     "personalization).")
flags.DEFINE_list("site_test_clients", list(_F["site_test_clients"]),
                  "--personalize_steps: site:client pairs naming the held-out client each "
                  "site's personalized model is scored on (default: the embedded data's own "
                  "map, else the client of the site's own name).")
flags.DEFINE_boolean("test_every_eval", _F["test_every_eval"],
                     "With validation (--validation_fraction or a val/ folder): score the "
                     "held-out test set at every "
                     "evaluation round too (by default only at round 0, the last round and "
                     "on the exported model).")
flags.DEFINE_integer("seed", _F["seed"], "Seed for splits, client sampling and prompts.")
flags.DEFINE_string("output_dir", "runs/latest", "Where outputs are written. A run already "
                    "there with the same settings is resumed from its last saved round.")
flags.DEFINE_boolean("fresh", False, "Discard a previous run in --output_dir instead of "
                     "resuming it.")

FLAGS = flags.FLAGS

# `--help` lists the flags by topic, in this order (`--helpfull`: absl's full list).
HELP_GROUPS = (
    ("data", ("data_dir", "data", "partition", "num_clients", "dirichlet_alpha",
              "test_fraction", "validation_fraction", "labels_per_site", "binary_components",
              "skip_bad_examples", "train_clients",
              "pool_clients")),
    ("model", ("model", "train_iou_head", "embedding_cache", "cache_dir", "encode_batch_size",
               "adapter", "lora_rank", "lora_alpha", "lora_targets")),
    ("prompts", ("prompt", "box_jitter", "box_jitter_fraction", "num_points",
                 "num_negative_points", "prompts_per_image", "sub_iterations")),
    ("training (on each client)", ("local_epochs", "batch_size", "client_optimizer",
                                   "client_lr", "loss", "seed")),
    ("federated (rounds and aggregation)", (
        "rounds", "clients_per_round", "clients_per_subround", "server_optimizer", "server_lr",
        "server_momentum", "server_beta_1", "server_beta_2", "server_epsilon",
        "zeroing", "zeroing_quantile", "zeroing_multiplier", "clipping", "clipping_quantile",
        "clipping_initial_norm", "execution", "workers", "worker_timeout")),
    ("privacy and communication", ("algorithm", "proximal_strength", "dp_noise_multiplier",
                                   "dp_clip_norm", "dp_target_quantile", "dp_delta",
                                   "secure_aggregation", "update_compression")),
    ("evaluation", ("eval_every", "eval_max_objects", "eval_prompt", "eval_corrections",
                    "keep_best", "test_every_eval")),
    ("automatic segmentation (--eval_prompt=automatic)", config_lib.AUTOMATIC_SETTINGS),
    ("personalization", ("personalize_steps", "site_test_clients")),
    ("output", ("output_dir", "fresh")),
)


def grouped_help(doc: str = __doc__, extra_groups=()) -> str:
  """The usage text and this binary's flags by topic (`HELP_GROUPS`, then `extra_groups`).

  Args:
    doc: The usage text (a binary that takes these flags too passes its own).
    extra_groups: More (title, flag names) groups, that binary's own flags.
  """
  lines = [doc.strip()]
  for title, names in (*HELP_GROUPS, *extra_groups):
    lines.append(f"\n{title}:")
    for name in names:  # One at a time: absl would sort them by name.
      FLAGS._render_flag_list([FLAGS[name]], lines, prefix="  ")  # pylint: disable=protected-access
  lines.append("\n--flagfile=FILE reads flags from a file (see experiments/); --helpfull "
               "also lists absl's own flags.")
  return "\n".join(lines)


def parse_flags(argv: list[str], *, doc: str = __doc__, extra_groups=()) -> list[str]:
  """absl's flag parsing, with `--help` answered by `grouped_help(doc, extra_groups)`."""
  return runtime.parse_flags(argv, usage=lambda: grouped_help(doc, extra_groups))


def config_from_flags(*, defaults_for: tuple[str, ...] = ()) -> config_lib.RunConfig:
  """Copies the flags into a validated `RunConfig` (the only place flags are read).

  `--execution=auto` becomes `cpp` with `--workers` (remote workers are TFF's C++
  workers), else `tf`.

  Args:
    defaults_for: Settings left at their defaults whatever their flags say (a binary
      that uses those flags otherwise reads them with `flag_values`).
  """
  values = flag_values(tuple(f.name for f in dataclasses.fields(config_lib.RunConfig)
                            if f.name != "labels_per_site"))
  if "labels_per_site" not in defaults_for:
    counts = label_counts()
    errors.require(len(counts) == 1, "labels_per_site",
                   "takes one count for a run (compare takes a list)")
    values["labels_per_site"] = counts[0]
  values.update({f.name: f.default for f in dataclasses.fields(config_lib.RunConfig)
                 if f.name in defaults_for})
  if values["execution"] == "auto":
    values["execution"] = (config_lib.CPP_EXECUTION if values["workers"]
                           else config_lib.TF_EXECUTION)
  return config_lib.RunConfig(**values).validate()


def label_counts() -> tuple[int, ...]:
  """`--labels_per_site` as counts (`all` = 0, every image), in the order given."""
  counts = []
  for value in FLAGS.labels_per_site.split(","):
    value = value.strip()
    if value != "all" and not (value.isdigit() and int(value) >= 1):
      raise errors.ConfigError("labels_per_site", f"takes counts >= 1 or all, got {value!r}")
    counts.append(0 if value == "all" else int(value))
  errors.require(len(set(counts)) == len(counts), "labels_per_site", "lists a count twice")
  return tuple(counts)


def flag_values(names: tuple[str, ...]) -> dict:
  """The `RunConfig` settings `names` as their flags say (tuples where the config has them)."""
  return {n: tuple(FLAGS[n].value) if n in config_lib.TUPLE_SETTINGS else FLAGS[n].value
          for n in names}


def main(argv):
  # -v 0 shows the per-round release log.
  runtime.begin_binary(argv, warnings_only=not FLAGS["verbosity"].present)

  def job(config: config_lib.RunConfig):
    # lazy: TensorFlow and TFF load only after the flags are checked.
    from tff_sam.federated.backends import execution  # pylint: disable=g-import-not-at-top
    from tff_sam.federated.program import program  # pylint: disable=g-import-not-at-top
    execution.configure_tff_execution(execution=config.execution,
                                      num_subrounds=config.num_subrounds,
                                      workers=config.workers,
                                      worker_timeout=config.worker_timeout)
    program.run_experiment(config, fresh=FLAGS.fresh)

  return runtime.run_job(job, settings=config_from_flags, cleanup=runtime.end_local_workers_if_loaded)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
