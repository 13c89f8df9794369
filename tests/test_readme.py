"""README's measured numbers come from files the project commits, and the demo is the
comparison's demo arm."""

import json
import re

from tff_sam import config as config_lib
from tff_sam.federated.program import compare

from conftest import REPO, flagfile_config

DEMO_COMPARE = REPO / "docs" / "demo_compare.json"


def _tables(markdown: str) -> dict[str, list[str]]:
  """Each table's bold heading -> its rows ("| ..." lines)."""
  tables, heading = {}, None
  for line in markdown.splitlines():
    if re.match(r"^\*\*.+\*\*", line):
      heading = line
      tables[heading] = []
    elif line.startswith("|") and heading is not None:
      tables[heading].append(line)
  return tables


def test_readme_demo_tables_are_the_committed_comparisons():
  """Every table of docs/demo_compare.json's compare.md that README shows is shown
  whole and unchanged (the point-prompt tables at least)."""
  result = json.loads(DEMO_COMPARE.read_text())
  readme = (REPO / "README.md").read_text()
  shown = [h for h in _tables(compare.markdown_of(result)) if h in readme]
  assert any(h.startswith("**point prompts**") for h in shown), shown
  assert any(h.startswith("**point prompts, each site") for h in shown), shown
  for heading, rows in _tables(compare.markdown_of(result)).items():
    if heading in readme:
      assert _tables(readme)[heading] == rows, heading


def test_demo_flags_are_the_comparisons_federated_arm():
  """`make demo` runs exactly the settings of docs/demo_compare.json's federated arm
  (but its folder), so it prints seed 0's numbers of that comparison."""
  demo = flagfile_config("demo.flags")
  measured = {**config_lib.RunConfig(output_dir="").to_dict(),  # Newer settings: defaults.
               **json.loads(DEMO_COMPARE.read_text())["config"]}
  assert {k for k in demo if demo[k] != measured.get(k)} == {"output_dir"}
