"""The federated training loop, apart from its platform wiring.

As in TFF's `examples/program/program_logic.py`: `train_model` knows nothing of
flags, files or execution contexts. It takes the process, the initial state, how to
select a round's clients, how to evaluate, and TFF program state and release
managers, all as keyword arguments; `tff_sam.federated.program.program` wires them to the
run's files and data.

The loop:

1. `program_state_manager.load_latest(initial_state)`: a saved state after round N
   resumes with round N + 1 (nothing is re-run; a saved round at or past
   `total_rounds` runs nothing); no saved state starts with round 0, which only
   evaluates the initial (zero-shot) model and releases its metrics;
2. every round r: `train_process.next(state, client_selection(r))`, its metrics
   (`round_metrics(result)`), evaluation every `evaluation_periodicity` rounds and
   at the last round (`evaluation(state, r)`), the round's wall time (`seconds`),
   then the row is released (key r) and only after that the state saved (version r),
   so a round whose state is saved always has its metrics released.

Every released row has the same keys: `columns` (None where not measured), then
whatever the callables returned.
"""

import asyncio
import time
from typing import Any, Callable, Mapping, Optional, Sequence

Metrics = dict[str, Any]


def _release(manager: Any, row: Metrics, round_num: int) -> None:
  asyncio.run(manager.release(row, round_num))


def train_model(*, train_process: Any, initial_state: Any, total_rounds: int,
                client_selection: Callable[[int], Sequence[str]],
                round_metrics: Callable[[Any], Mapping[str, Any]],
                evaluation: Callable[[Any, int], Mapping[str, Any]],
                evaluation_periodicity: int, program_state_manager: Any,
                metrics_release_manager: Any, columns: Sequence[str] = (),
                on_round: Optional[Callable[[int, Metrics], None]] = None,
                on_resume: Optional[Callable[[int], None]] = None,
                clock: Callable[[], float] = time.monotonic) -> tuple[Any, int]:
  """Runs rounds 0 (or the first unsaved one) to `total_rounds`; see the module docstring.

  Args:
    train_process: A `tff.templates.IterativeProcess`-like object whose
      `next(state, clients)` returns an object with `.state`.
    initial_state: The state before round 1 (also the structure to load into).
    total_rounds: The last round.
    client_selection: Round number -> the clients passed to `next`.
    round_metrics: The result of `next` -> that round's training metrics.
    evaluation: (state, round number) -> evaluation metrics of that state.
    evaluation_periodicity: Evaluate every this many rounds (>= 1).
    program_state_manager: A `tff.program.ProgramStateManager`.
    metrics_release_manager: A `tff.program.ReleaseManager` (key: round number).
    columns: Keys every released row has (None unless measured).
    on_round: Called with (round number, released row) after each round.
    on_resume: Called with the saved round a run resumes after.
    clock: Seconds, for the `seconds` column.

  Returns:
    (final state, last round whose state it is).

  Raises:
    ValueError: `evaluation_periodicity` < 1 or `total_rounds` < 0.
  """
  if evaluation_periodicity < 1:
    raise ValueError(f"evaluation_periodicity must be >= 1, got {evaluation_periodicity}")
  if total_rounds < 0:
    raise ValueError(f"total_rounds must be >= 0, got {total_rounds}")
  state, version = asyncio.run(program_state_manager.load_latest(initial_state))
  if state is None:
    state, version = initial_state, 0
    start = clock()
    row = dict.fromkeys(columns)
    row.update(evaluation(state, 0))
    row["seconds"] = round(clock() - start, 2)
    _release(metrics_release_manager, row, 0)
    if on_round is not None:
      on_round(0, row)
  elif on_resume is not None:
    on_resume(version)

  for round_num in range(version + 1, total_rounds + 1):
    start = clock()
    result = train_process.next(state, list(client_selection(round_num)))
    state = result.state
    row = dict.fromkeys(columns)
    row.update(round_metrics(result))
    if round_num % evaluation_periodicity == 0 or round_num == total_rounds:
      row.update(evaluation(state, round_num))
    row["seconds"] = round(clock() - start, 2)
    _release(metrics_release_manager, row, round_num)
    asyncio.run(program_state_manager.save(state, round_num))
    version = round_num
    if on_round is not None:
      on_round(round_num, row)
  return state, version
