"""The decoder-collapse guard of `--keep_best`: the best evaluated round's weights.

After each held-out evaluation the program offers the round's score and global
weights; a round that beats every earlier evaluated round (round 0, the zero-shot
model, included) is written to `best/round_<N>.npz` (atomically), and the previous
best file is kept as a fallback until the next improvement. Resuming after saved
round V drops files of rounds > V (they belong to rounds that are redone) and
continues from the newest file <= V, whose score is that round's `metrics.csv` row.

Selecting on the held-out set makes its score an optimistic estimate of the selected
model; the program reports it as "best round", next to the last round's.
"""

import io
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tff_sam import errors
from tff_sam import fileio

BEST_DIR = "best"
_NAME = re.compile(r"round_(\d+)\.npz")


class BestModelKeeper:
  """Keeps the weights of the best-scoring evaluated round in `<run>/best/`."""

  def __init__(self, run_dir: Path):
    self.dir = Path(run_dir) / BEST_DIR
    self.round: Optional[int] = None
    self.score: Optional[float] = None

  def _files(self) -> dict[int, Path]:
    if not self.dir.is_dir():
      return {}
    return {int(m.group(1)): p for p in self.dir.iterdir()
            if (m := _NAME.fullmatch(p.name))}

  def clear(self) -> None:
    """Forgets everything (a fresh run)."""
    for path in self._files().values():
      path.unlink(missing_ok=True)
    self.round = self.score = None

  def restore(self, *, saved_round: int, scores: dict[int, float]) -> None:
    """Continues after saved round `saved_round`; `scores` are the released rounds'.

    Args:
      saved_round: The newest saved state's round.
      scores: Round -> its held-out score, from `metrics.csv`.
    """
    files = self._files()
    for r, path in files.items():
      if r > saved_round:
        path.unlink(missing_ok=True)
    kept = [r for r in files if r <= saved_round and r in scores]
    self.round = max(kept) if kept else None
    self.score = scores[self.round] if kept else None

  def consider(self, round_num: int, score: Optional[float],
               weights: tuple[Sequence[np.ndarray], Sequence[np.ndarray]]) -> bool:
    """Keeps round `round_num`'s (trainable, non_trainable) weights if it scores best.

    Returns:
      Whether it is the new best.
    """
    if score is None or not np.isfinite(score):
      return False
    if self.score is not None and score <= self.score:
      return False
    trainable, non_trainable = weights
    buffer = io.BytesIO()
    np.savez(buffer, **{f"t{i}": np.asarray(w) for i, w in enumerate(trainable)},
             **{f"n{i}": np.asarray(w) for i, w in enumerate(non_trainable)})
    fileio.write_bytes(self.dir / f"round_{round_num}.npz", buffer.getvalue())
    previous = self.round
    for r, path in self._files().items():
      if r not in (round_num, previous):
        path.unlink(missing_ok=True)
    self.round, self.score = round_num, float(score)
    return True

  def weights(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The best round's (trainable, non_trainable) weights.

    Raises:
      errors.DataError: No best round, or its file is unreadable.
    """
    path = self.dir / f"round_{self.round}.npz"
    if self.round is None:
      raise errors.DataError(self.dir, "no best round was kept")
    try:
      with np.load(path) as data:
        count = lambda prefix: sum(1 for k in data.files if k.startswith(prefix))  # pylint: disable=g-long-lambda
        return ([data[f"t{i}"] for i in range(count("t"))],
                [data[f"n{i}"] for i in range(count("n"))])
    except (OSError, ValueError, KeyError) as e:
      raise errors.DataError(path, f"unreadable best-round weights ({e}); pass --fresh "
                             "to start over") from None
