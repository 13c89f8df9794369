r"""Held-out Dice/IoU of any SAM model on a data folder.

  python -m tff_sam.experiments.evaluate --model M --data_dir D \
      [--prompt box|points|both] [--output_json F]

M is `mobile_sam` (the default), a hub id, or a directory (e.g. a run's model/). Evaluates the folder's
`test/` split when it has one, else every image (`--split` to choose). Prints and
writes JSON with `dice`, `iou`, `num_objects`, `num_images` per prompt mode.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF and TFF's C++ worker: errors only.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # No TF-deprecation banner.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from tff_sam import config as config_lib
from tff_sam import runtime

flags.DEFINE_string("model", config_lib.MOBILE_SAM_MODEL, config_lib.MODEL_HELP)
flags.DEFINE_string("data_dir", None, "Data folder (same layout as for run). Default: the "
                    "--data dataset.")
flags.DEFINE_enum("data", config_lib.SAMPLE_DATASET, config_lib.NAMED_DATASETS,
                  "Embedded dataset used when --data_dir is not given.")
flags.DEFINE_enum("split", "auto", ["auto", "test", "all"],
                  "auto: test/ if present, else all images.")
flags.DEFINE_multi_enum("prompt", [config_lib.BOX_PROMPT, config_lib.POINTS_PROMPT],
                        config_lib.SINGLE_PASS_PROMPTS,
                        "Prompt mode(s) to evaluate (repeat the flag for several).")
flags.DEFINE_boolean("binary_components", False,
                     "Binary masks: one object per connected component.")
flags.DEFINE_integer("max_objects", 0, "At most this many objects per image (0 = all).")
flags.DEFINE_string("cache_dir", None, "Cache root (default $TFF_SAM_CACHE or ~/.cache/tff_sam).")
flags.DEFINE_integer("encode_batch_size", 4, "Images per encoder call.")
flags.DEFINE_string("output_json", None, "Also write the results here.")

FLAGS = flags.FLAGS


def main(argv):
  runtime.begin_binary(argv)

  def job():
    # lazy: TensorFlow loads only after the flags are parsed.
    from tff_sam import fileio  # pylint: disable=g-import-not-at-top
    from tff_sam.evaluation import heldout  # pylint: disable=g-import-not-at-top
    result = heldout.evaluate_folder(
        model=FLAGS.model, data_dir=FLAGS.data_dir, data_name=FLAGS.data, split=FLAGS.split,
        prompts=FLAGS.prompt, binary_components=FLAGS.binary_components,
        max_objects_per_image=FLAGS.max_objects, cache_dir=FLAGS.cache_dir,
        encode_batch_size=FLAGS.encode_batch_size)
    for mode, r in result["results"].items():
      print(f"{mode:>6}: dice {r['dice']:.4f}  iou {r['iou']:.4f}  "
            f"({r['num_objects']} objects, {r['num_images']} images)")
    if FLAGS.output_json:
      fileio.write_json(FLAGS.output_json, result)
    print(json.dumps(result))

  return runtime.run_job(job)


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
