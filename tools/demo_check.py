"""After `make demo`: this run's numbers next to the committed comparison's.

    python tools/demo_check.py RUN_DIR COMPARE_JSON

Prints, per evaluation prompt, the run's exported-model Dice next to the same arm and
seed of the comparison (`federated`, the run's `--seed`) and that arm's mean ± std
over the comparison's seeds, and the same for the personalized sites (each on its
own held-out client, mean over sites: the own-site view's `personalized` row). The numbers
are the same computation on the same data, so they should agree to about 1e-4 (CPU
kernels may round differently on another machine); a larger difference, or settings
that differ, is said in one line. Exits 1 only when a file is missing or unreadable.
"""

import json
from pathlib import Path
import sys

from tff_sam import config as config_lib

# Settings that may differ between the run and the comparison's federated arm.
_IGNORED = ("output_dir",)
_TOLERANCE = 1e-3


def _load(path: Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    sys.exit(f"error: {path}: cannot be read ({e.__class__.__name__}: {e})")


def _arm(compare: dict, name: str, seed: int) -> dict | None:
  return next((a for a in compare["arms"] if a["name"] == name and a["seed"] == seed), None)


def _line(label: str, mine: float, theirs: float | None, stats: dict | None) -> str:
  """One comparison line, values x100 as in README's tables."""
  seeds = (f"; {stats['n']} seed(s): {100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"
           if stats and stats.get("mean") is not None else "")
  if theirs is None:
    return f"  {label}: this run {100 * mine:.2f} (not in the comparison{seeds})"
  same = ("the same" if abs(mine - theirs) <= _TOLERANCE
          else f"DIFFERS by {100 * (mine - theirs):+.2f}")
  return f"  {label}: this run {100 * mine:.2f}, comparison {100 * theirs:.2f} ({same}){seeds}"


def _mean(values: list) -> float | None:
  return sum(values) / len(values) if values and None not in values else None


def main(run_dir: Path, compare_json: Path) -> int:
  summary, compare = _load(run_dir / "summary.json"), _load(compare_json)
  seed = summary["config"]["seed"]
  # A setting newer than the comparison has its default there.
  measured = config_lib.RunConfig.saved_settings(compare["config"])
  changed = sorted(k for k, v in summary["config"].items()
                   if k not in _IGNORED and measured.get(k) != v)
  print(f"{run_dir} vs {compare_json} (its federated arm, seed {seed}; held-out Dice x100):")
  if changed:
    print(f"  note: this run's settings differ from the comparison's: {', '.join(changed)}")
  arm = _arm(compare, "federated", seed) or {}
  for prompt, result in summary["evaluation"]["by_prompt"].items():
    table = compare["table"].get(prompt, {})
    print(_line(f"federated, {prompt} prompts, every held-out client", result["dice"],
                arm.get("results", {}).get(prompt, {}).get("dice"),
                table.get("rows", {}).get("federated", {}).get("dice", {}).get("all")))
    sites = summary.get("personalized", {}).get("sites", {})
    if sites:
      theirs = arm.get("personalized", {})
      print(_line(
          f"personalized, {prompt} prompts, each site on its own client (mean over "
          f"{len(sites)} sites)",
          _mean([r["by_prompt"][prompt]["personalized"]["dice"] for r in sites.values()]),
          _mean([theirs.get(s, {}).get(prompt, {}).get("dice") for s in sites]),
          table.get("own_site", {}).get("rows", {}).get("personalized", {}).get(
              "dice", {}).get("all")))
  return 0


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit(__doc__.strip().splitlines()[2].strip())
  sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
