r"""Zero-shot vs local-only vs centralized vs federated (vs federated + LoRA) fine-tuning,
per site, in one command.

  python -m tff_sam.experiments.compare --flagfile=experiments/demo.flags --seeds=3 \
      [--eval_prompt=box,point,box_corrections] [--leave_one_site_out] \
      [--arms=zero_shot,federated,fed_lora]

Takes every flag of `python -m tff_sam.experiments.run` (so a run's flagfile works);
they define the federated arm, except `--lora_rank/--lora_alpha/--lora_targets`, which
set the `fed_lora` arm's adapters (unless `--adapter=lora` makes every arm adapted). The other arms change only what makes them what they
are (`tff_sam.federated.program.compare`). Arms go to `<--output_dir>/compare/seed<k>/<arm>/`,
each a complete run folder; a re-run resumes or skips them. Writes `compare.json`,
`compare.md` (the table, also printed) and `compare.png` into `<--output_dir>/compare/`.
"""

from pathlib import Path

from absl import app
from absl import flags

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam import runtime
from tff_sam.experiments import run as run_binary

flags.DEFINE_integer("seeds", 1, "Seeds per arm: --seed, --seed + 1, ... (mean ± std over them).")
flags.DEFINE_boolean("leave_one_site_out", False,
                     "Also train federated without each training site in turn, evaluated on "
                     "every held-out client (generalization to an unseen site).")
flags.DEFINE_list("arms", list(config_lib.COMPARE_ARMS),
                  "Arms to run: zero_shot, local (each site alone), centralized, federated, "
                  "fed_lora (federated with --adapter=lora; skipped when the settings already "
                  "have an adapter).")

FLAGS = flags.FLAGS
COMPARE_DIR = "compare"
# `--help` lists run's topics (`run.HELP_GROUPS`), then these.
HELP_GROUPS = (("comparison", ("seeds", "leave_one_site_out", "arms")),)


def _settings() -> tuple[config_lib.RunConfig, dict, tuple[int, ...]]:
  """The federated arm's validated settings, the `fed_lora` arm's adapter settings and
  the labelled images per site of each comparison (`--labels_per_site`, 0 = all)."""
  adapted = FLAGS.adapter != config_lib.NO_ADAPTER
  config = run_binary.config_from_flags(
      defaults_for=("labels_per_site",) + (() if adapted else config_lib.LORA_SETTINGS))
  lora = {} if adapted else run_binary.flag_values(config_lib.LORA_SETTINGS)
  labels = run_binary.label_counts()
  errors.require(FLAGS.seeds >= 1, "seeds", f"must be >= 1, got {FLAGS.seeds}")
  unknown = [a for a in FLAGS.arms if a not in config_lib.COMPARE_ARMS]
  errors.require(not unknown and bool(FLAGS.arms), "arms",
                 f"must list arms of {config_lib.COMPARE_ARMS}, got "
                 f"{','.join(FLAGS.arms) or 'none'}")
  errors.require(not config.train_clients and not config.pool_clients, "train_clients",
                 "and --pool_clients choose the arms' clients themselves; drop them")
  return config, lora, labels


def main(argv):
  runtime.begin_binary(argv, warnings_only=not FLAGS["verbosity"].present)

  def job(settings: tuple[config_lib.RunConfig, dict, tuple[int, ...]]):
    # lazy: TensorFlow and TFF load only after the flags are checked.
    from tff_sam.federated.backends import execution  # pylint: disable=g-import-not-at-top
    from tff_sam.federated.program import compare  # pylint: disable=g-import-not-at-top
    config, lora, labels = settings
    execution.configure_tff_execution(execution=config.execution,
                                      num_subrounds=config.num_subrounds,
                                      workers=config.workers,
                                      worker_timeout=config.worker_timeout)
    compare.run_comparison(config, seeds=FLAGS.seeds,
                           leave_one_site_out=FLAGS.leave_one_site_out,
                           root=Path(config.output_dir).expanduser() / COMPARE_DIR,
                           arms=tuple(FLAGS.arms), lora=lora, labels=labels,
                           fresh=FLAGS.fresh)

  return runtime.run_job(job, settings=_settings, cleanup=runtime.end_local_workers_if_loaded)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: run_binary.parse_flags(
      argv, doc=__doc__, extra_groups=HELP_GROUPS))
