"""README's measured numbers come from files the project commits, and the demo is the
comparison's demo arm.

A paragraph right after `<!-- numbers: FILE ... -->` may show only numbers found in
those files: in a JSON file as a value (or the value x100) at the shown precision, in a
markdown file as written.
"""

import json
import re
from pathlib import Path

from tff_sam import config as config_lib
from tff_sam.federated.program import compare

from conftest import REPO, flagfile_config

DEMO_COMPARE = REPO / "docs" / "demo_compare.json"
DEMO_LABELS = REPO / "docs" / "demo_labels.json"
DEMO_AUTOMATIC = REPO / "docs" / "demo_automatic_compare.json"
PAGES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
# `<!-- numbers: FILE ... -->`, then the paragraph it vouches for.
NUMBERS_MARK = re.compile(r"^<!-- numbers: ([^>]*?) -->\n(.+?)(?:\n[ \t]*\n|\Z)", re.S | re.M)
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# A number as written (not inside a word such as `SA50` or `x100`, nor a version's tail).
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?!\.?\d)")


def _tables(markdown: str) -> dict[str, list[str]]:
  """Each table's bold heading -> its rows (the "| ..." lines of the first table after
  it, up to the first line that is not a row)."""
  tables, heading = {}, None
  for line in markdown.splitlines():
    if re.match(r"^\*\*.+\*\*", line):
      heading = line
      tables[heading] = []
    elif heading is not None and line.startswith("|"):
      tables[heading].append(line)
    elif heading is not None and tables[heading]:
      heading = None  # The table ended.
  return tables


def test_readme_demo_tables_are_the_committed_comparisons():
  """Every table of docs/demo_compare.json's compare.md that README or the comparison
  page shows is shown whole and unchanged: README the point-prompt tables at least, the
  comparison page every one."""
  rendered = _tables(compare.markdown_of(json.loads(DEMO_COMPARE.read_text())))
  for page, required in ((REPO / "README.md", ("**point prompts**", "**point prompts, each site")),
                         (REPO / "docs" / "comparison.md", tuple(rendered))):
    text = page.read_text()
    shown = [h for h in rendered if h in text]
    for start in required:
      assert any(h.startswith(start) for h in shown), (page.name, start, shown)
    for heading in shown:
      assert _tables(text)[heading] == rendered[heading], (page.name, heading)


def test_label_curve_tables_are_the_committed_label_comparison():
  """The label curve's tables (docs/demo_labels.json) are shown unchanged: the point
  one in README, both in the comparison page, with the picture drawn from that JSON."""
  rendered = {h: rows for h, rows in _tables(compare.markdown_of(
      json.loads(DEMO_LABELS.read_text()))).items() if "by labelled training images" in h}
  assert len(rendered) == 2, list(rendered)
  for page, required in ((REPO / "README.md", ("**point prompts: Dice by labelled",)),
                         (REPO / "docs" / "comparison.md", tuple(rendered))):
    text = page.read_text()
    for start in required:
      heading = next(h for h in rendered if h.startswith(start))
      assert heading in text and _tables(text)[heading] == rendered[heading], (page.name, heading)
  assert "(demo_labels.png)" in (REPO / "docs" / "comparison.md").read_text()


def test_automatic_tables_are_the_committed_automatic_comparison():
  """The evaluation page's automatic-segmentation tables (every arm, and each site on its
  own client) are docs/demo_automatic_compare.json's, unchanged."""
  rendered = {h: rows for h, rows in _tables(compare.markdown_of(
      json.loads(DEMO_AUTOMATIC.read_text()))).items() if h.startswith("**automatic")}
  assert len(rendered) == 2, list(rendered)
  text = (REPO / "docs" / "evaluation.md").read_text()
  for heading, rows in rendered.items():
    assert heading in text and _tables(text)[heading] == rows, heading


def _json_numbers(path: Path) -> list[float]:
  values = []

  def walk(node):
    if isinstance(node, dict):
      for value in node.values():
        walk(value)
    elif isinstance(node, list):
      for value in node:
        walk(value)
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
      values.append(abs(float(node)))

  walk(json.loads(path.read_text()))
  return values


def _found(number: str, source: Path, json_values: list[float]) -> bool:
  """Whether `number` (as written, sign dropped) is in `source`."""
  if source.suffix == ".json":
    decimals = len(number.partition(".")[2])
    return any(abs(round(v * scale, decimals) - float(number)) < 1e-9
               for v in json_values for scale in (1, 100))
  return re.search(rf"(?<![\d.]){re.escape(number)}(?!\.?\d)", source.read_text()) is not None


def _marked_paragraphs() -> list[tuple[Path, list[Path], str]]:
  return [(page, [REPO / name for name in m.group(1).split()], m.group(2))
          for page in PAGES for m in NUMBERS_MARK.finditer(page.read_text())]


def test_readme_numbers_come_from_committed_files():
  """Every number (and date) of a paragraph marked `<!-- numbers: FILE ... -->` is in
  one of those files; README marks its headline result (from docs/demo_compare.json) and
  its measured times (BENCHMARKS.md and the demo's page) that way."""
  marked = _marked_paragraphs()
  readme_sources = {s.relative_to(REPO).as_posix() for page, sources, _ in marked
                    if page.name == "README.md" for s in sources}
  assert {"docs/demo_compare.json", "BENCHMARKS.md"} <= readme_sources, readme_sources
  for page, sources, paragraph in marked:
    assert all(s.is_file() for s in sources), (page.name, sources)
    json_values = [v for s in sources if s.suffix == ".json" for v in _json_numbers(s)]
    dates = DATE.findall(paragraph)
    numbers = NUMBER.findall(DATE.sub(" ", paragraph))
    assert len(numbers) >= 3, (page.name, paragraph)  # A mark on a paragraph of numbers.
    missing = [d for d in dates if not any(d in s.read_text() for s in sources)]
    missing += [n for n in numbers if not any(_found(n, s, json_values) for s in sources)]
    assert not missing, (f"{page.name}: numbers in no file of "
                         f"{[s.name for s in sources]}: {missing}", paragraph)


def test_readme_headline_shows_the_comparisons_point_dice():
  """README's headline paragraph states the zero-shot and federated point-prompt Dice
  of docs/demo_compare.json as its table renders them (x100, one decimal)."""
  rows = json.loads(DEMO_COMPARE.read_text())["table"]["point"]["rows"]
  headline = next(p for page, sources, p in _marked_paragraphs()
                  if page.name == "README.md" and DEMO_COMPARE in sources)
  zero_shot, federated = (rows[arm]["dice"]["all"] for arm in ("zero_shot", "federated"))
  assert f"{100 * zero_shot['mean']:.1f}" in headline, headline
  assert f"{100 * federated['mean']:.1f} ± {100 * federated['std']:.1f}" in headline, headline


def test_demo_flags_are_the_comparisons_federated_arm():
  """`make demo` runs exactly the settings of docs/demo_compare.json's federated arm
  (but its folder), so it prints seed 0's numbers of that comparison."""
  demo = flagfile_config("demo.flags")
  measured = config_lib.RunConfig.saved_settings(  # Newer settings: defaults.
      json.loads(DEMO_COMPARE.read_text())["config"])
  assert {k for k in demo if demo[k] != measured.get(k)} == {"output_dir"}
