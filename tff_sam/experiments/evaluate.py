r"""Held-out scores of any SAM model on a data folder, as a run reports them.

  python -m tff_sam.experiments.evaluate --model M --data_dir D \
      [--eval_prompt box,point,box_corrections,automatic] [--output_json F]

M is `mobile_sam` (the default), a hub id, or a directory (e.g. a run's model/).
Evaluates the folder's `test/` split when it has one, else every image (`--split` to
choose), per evaluation client (each `test/<site>/`), with run's evaluation prompts
and metrics: Dice, IoU, mSA, SA50, SA75 (automatic: mSA, SA50, SA75 and objects found).
Prints a line per prompt and writes JSON keyed by prompt (`results[<prompt>]`).
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF and TFF's C++ worker: errors only.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # No TF-deprecation banner.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from tff_sam import config as config_lib
from tff_sam import errors
from tff_sam import runtime
from tff_sam.experiments import automatic_flags

flags.DEFINE_string("model", config_lib.MOBILE_SAM_MODEL, config_lib.MODEL_HELP)
flags.DEFINE_string("data_dir", None, "Data folder (same layout as for run). Default: the "
                    "--data dataset.")
flags.DEFINE_enum("data", config_lib.SAMPLE_DATASET, config_lib.NAMED_DATASETS,
                  "Embedded dataset used when --data_dir is not given.")
flags.DEFINE_enum("split", "auto", ["auto", "test", "all"],
                  "auto: test/ if present, else all images.")
flags.DEFINE_list("eval_prompt", [config_lib.BOX_EVAL, config_lib.POINT_EVAL],
                  "Evaluation prompts, as for run: " + ", ".join(config_lib.EVAL_PROMPTS)
                  + " (automatic: no prompt, SAM's automatic mask generation).")
flags.DEFINE_integer("eval_corrections", 3, "Corrective points of box_corrections.")
flags.DEFINE_boolean("binary_components", False,
                     "Binary masks: one object per connected component.")
flags.DEFINE_integer("max_objects", 0, "At most this many prompted objects per image (0 = "
                     "all; automatic is scored on every object).")
flags.DEFINE_string("cache_dir", None, "Cache root (default $TFF_SAM_CACHE or ~/.cache/tff_sam).")
flags.DEFINE_integer("encode_batch_size", 4, "Images per encoder call.")
flags.DEFINE_string("output_json", None, "Also write the results here.")

FLAGS = flags.FLAGS


def _settings():
  """The evaluation prompts and automatic settings from the flags, checked."""
  config_lib.require_choices(tuple(FLAGS.eval_prompt), config_lib.EVAL_PROMPTS, "eval_prompt",
                             "prompt")
  errors.require(FLAGS.eval_corrections >= 1, "eval_corrections",
                 f"must be >= 1, got {FLAGS.eval_corrections}")
  return tuple(FLAGS.eval_prompt), automatic_flags.settings()


def main(argv):
  runtime.begin_binary(argv)

  def job(settings):
    # lazy: TensorFlow loads only after the flags are checked.
    from tff_sam import fileio  # pylint: disable=g-import-not-at-top
    from tff_sam.evaluation import heldout  # pylint: disable=g-import-not-at-top
    prompts, automatic = settings
    result = heldout.evaluate_folder(
        model=FLAGS.model, data_dir=FLAGS.data_dir, data_name=FLAGS.data, split=FLAGS.split,
        eval_prompts=prompts, corrections=FLAGS.eval_corrections, automatic_settings=automatic,
        binary_components=FLAGS.binary_components, max_objects_per_image=FLAGS.max_objects,
        cache_dir=FLAGS.cache_dir, encode_batch_size=FLAGS.encode_batch_size)
    for prompt, r in result["results"].items():
      print(f"{prompt}: {heldout.EvalResult(**r).scores_line()}  ({r['num_images']} images)")
      for client, c in r["by_client"].items():
        print(f"  {client}: {heldout.EvalResult(**c, eval_prompt=prompt).scores_line()}")
    if FLAGS.output_json:
      fileio.write_json(FLAGS.output_json, result)
    print(json.dumps(result))

  return runtime.run_job(job, settings=_settings)


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
