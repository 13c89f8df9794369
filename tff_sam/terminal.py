"""Progress bars for the user's terminal.

A bar redraws one line with carriage returns; in a log file, a pipe or a notebook
that is a stream of fragments mixed into the log lines. So a bar is drawn only when
stderr is a terminal; elsewhere the caller's own lines (one per image, per round)
are the progress.
"""

import sys
from typing import Any, Iterable, Optional

from tqdm import tqdm


def progress_bar(iterable: Optional[Iterable] = None, *, disable: bool = False,
                 **kwargs: Any) -> tqdm:
  """A tqdm bar on stderr, left behind by nothing, drawn only on a terminal.

  Args:
    iterable: What the bar counts (None: update it by hand).
    disable: No bar whatever stderr is.
    **kwargs: tqdm's (`total`, `desc`, `unit`, ...).
  """
  return tqdm(iterable, file=sys.stderr, leave=False,
              disable=disable or not sys.stderr.isatty(), **kwargs)
