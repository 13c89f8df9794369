"""Where a run's per-round metrics go: TFF release managers.

`build_release_manager` groups three `tff.program` release managers, each released
the same flat dict of metrics with the round number as key:

* `CSVFileReleaseManager` -> `metrics.csv` (write mode: every release rewrites the
  file through a temporary file and an atomic rename, and first drops rows of rounds
  >= the released one, so a resumed run never duplicates a round);
* `TensorBoardReleaseManager` -> `tensorboard/` event files (scalars; flushed after
  every release so a killed run keeps what it released);
* `LoggingReleaseManager` -> the `absl` log.

`write_tensorboard_images` adds PNG pictures (e.g. the overlays) to the same folder.
"""

import asyncio
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_federated as tff

TENSORBOARD_DIR = "tensorboard"
ROUND_KEY = "round"


class FlushingTensorBoardReleaseManager(tff.program.TensorBoardReleaseManager):
  """Flushes its event file after every release (TFF's flushes every 2 min)."""

  async def release(self, value, key: int) -> None:
    await super().release(value, key)
    self._summary_writer.flush()  # pylint: disable=protected-access


def build_release_manager(*, metrics_csv: Path, tensorboard_dir: Path):
  """A `tff.program.GroupingReleaseManager` writing CSV, TensorBoard and the log.

  Args:
    metrics_csv: The CSV file (created with a `round` column if missing).
    tensorboard_dir: Folder for TensorBoard event files.
  """
  return tff.program.GroupingReleaseManager([
      tff.program.CSVFileReleaseManager(
          file_path=str(metrics_csv), save_mode=tff.program.CSVSaveMode.WRITE,
          key_fieldname=ROUND_KEY),
      FlushingTensorBoardReleaseManager(summary_dir=str(tensorboard_dir)),
      tff.program.LoggingReleaseManager(),
  ])


def release(manager, values: Mapping[str, Optional[float]], *, round_num: int) -> None:
  """Releases one round's metrics (None = not measured this round: an empty CSV cell,
  no TensorBoard point)."""
  asyncio.run(manager.release(dict(values), round_num))


def write_tensorboard_images(tensorboard_dir: Path, pngs: Sequence[Path], *, step: int,
                             prefix: str = "overlays") -> int:
  """Adds PNG files as TensorBoard images (`<prefix>/<file stem>`) at `step`.

  Returns:
    How many images were written.
  """
  writer = tf.summary.create_file_writer(str(tensorboard_dir))
  with writer.as_default():
    for png in pngs:
      with Image.open(png) as im:
        pixels = np.asarray(im.convert("RGB"))
      tf.summary.image(f"{prefix}/{Path(png).stem}", pixels[None], step=step)
  writer.close()
  return len(pngs)
