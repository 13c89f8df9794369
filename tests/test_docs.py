"""README.md and docs/*.md stay true to the code: the generated flags page is current,
every shell command they show names a real binary, flag, flagfile and make target (and
builds a valid configuration), and every relative link and picture resolves.

Code blocks: a ```sh block is checked line by line (below); a ```python block is a
`<!-- snippet: NAME -->` that `tests/test_export_snippets.py` runs; a block without a
language (or ```text) is output, not code. A block right after
`<!-- no-check: REASON -->` is not checked, and is reported as skipped with REASON.

Shell lines: `make TARGET [VAR=VALUE]` needs the Makefile's target and variable;
`python -m tff_sam.experiments.BINARY ARGS` (any python) needs the binary, absl must
parse ARGS with only that binary's flags defined (`--flagfile` files included, read
from the repository root as the docs say), and the settings the binary builds from
them must validate (run's `RunConfig`, compare's arms, ...) without running anything;
`python tools/X.py` needs the script. Any other command is refused.
"""

import difflib
import importlib.util
import re
import shlex
from pathlib import Path
from typing import NamedTuple, Optional

from absl import flags
import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
FLAGS_PAGE = REPO / "docs" / "flags.md"


def _tool():
  spec = importlib.util.spec_from_file_location("flags_doc", REPO / "tools" / "flags_doc.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


flags_doc = _tool()

# The function each binary builds its settings with from parsed flags (what its `main`
# hands `runtime.run_job`), run on the documented flags. `export` checks that its
# `--model` is a folder on disk (a run's output), so only its flags are checked;
# `worker` and `prepare_sample_data` check theirs when they run.
VALIDATORS = {"run": "config_from_flags", "compare": "_settings", "bench": "config_from_flags",
              "evaluate": "_settings", "segment": "_settings", "predict": "_settings"}
NO_CHECK = re.compile(r"^<!-- no-check: (.+?) -->$")
SNIPPET = re.compile(r"^<!-- snippet: \w+ -->$")
PYTHONS = ("python", "python3", "python3.11")


class CommandError(Exception):
  """A documented command that would not run as written."""


class Block(NamedTuple):
  """A fenced code block of a page."""
  page: Path
  line: int  # Of its opening fence, 1-based.
  language: str
  code: str
  before: str  # The line above the opening fence.

  @property
  def where(self) -> str:
    return f"{self.page.relative_to(REPO)}:{self.line}"

  @property
  def skip_reason(self) -> Optional[str]:
    match = NO_CHECK.match(self.before)
    return match.group(1) if match else None


def _blocks(page: Path) -> list[Block]:
  blocks, lines = [], page.read_text().splitlines()
  start = None
  for i, line in enumerate(lines):
    if line.startswith("```"):
      if start is None:
        start = i
      else:
        blocks.append(Block(page, start + 1, lines[start][3:].strip(),
                            "\n".join(lines[start + 1:i]), lines[start - 1] if start else ""))
        start = None
  assert start is None, f"{page.name}:{start + 1}: a code block is not closed"
  return blocks


BLOCKS = [b for page in PAGES for b in _blocks(page)]
SH_BLOCKS = [b for b in BLOCKS if b.language == "sh"]


def _commands(code: str) -> list[list[str]]:
  """The block's commands as argument lists: `\\` continues a line, `#` starts a comment."""
  commands = []
  for line in code.replace("\\\n", " ").splitlines():
    words = shlex.split(line, comments=True)
    if words:
      commands.append(words)
  return commands


def _makefile() -> tuple[set[str], set[str]]:
  """The Makefile's targets and variables."""
  text = (REPO / "Makefile").read_text()
  targets = set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))
  variables = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*[?:]?=", text, re.M))
  return targets, variables


def _check_make(words: list[str]) -> None:
  targets, variables = _makefile()
  for word in words[1:]:
    name, is_variable, _ = word.partition("=")  # is_variable: "=" or "".
    if is_variable and name not in variables:
      raise CommandError(f"the Makefile sets no variable {name}")
    if not is_variable and word not in targets:
      raise CommandError(f"the Makefile has no target {word!r} (it has {sorted(targets)})")


def _check_binary(name: str, args: list[str]) -> None:
  """Parses `args` with binary `name`'s flags alone and validates its settings."""
  if name not in flags_doc.binaries():
    raise CommandError(f"no binary tff_sam.experiments.{name}")
  was_parsed = flags.FLAGS.is_parsed()
  try:
    with flags_doc.fresh_binary(name) as module:
      argv = flags.FLAGS([name, *args])  # flags.Error: unknown flag, bad value, flagfile.
      if argv != [name]:
        raise CommandError(f"{name} takes no positional arguments, got {argv[1:]}")
      if name in VALIDATORS:
        getattr(module, VALIDATORS[name])()
  finally:
    if not was_parsed:
      flags.FLAGS.unparse_flags()


def _check_command(words: list[str]) -> None:
  if words[0] == "make":
    _check_make(words)
  elif Path(words[0]).name in PYTHONS and words[1:2] == ["-m"]:
    package, _, name = words[2].rpartition(".")
    if package != flags_doc.PACKAGE:
      raise CommandError(f"{words[2]} is not a tff_sam binary")
    _check_binary(name, words[3:])
  elif Path(words[0]).name in PYTHONS:
    if not (REPO / words[1]).is_file():
      raise CommandError(f"no script {words[1]}")
  else:
    raise CommandError(f"no check for the command {words[0]!r}: mark its block "
                       "<!-- no-check: REASON --> or teach tests/test_docs.py to check it")


@pytest.mark.parametrize("block", SH_BLOCKS, ids=[b.where for b in SH_BLOCKS])
def test_shell_commands_run_as_written(block, monkeypatch):
  """Every command of the block names a make target or a binary, script and flags that
  exist, with a configuration that validates (see the module docstring)."""
  if block.skip_reason:
    pytest.skip(f"no-check: {block.skip_reason}")
  monkeypatch.chdir(REPO)  # `--flagfile=experiments/...` is relative to the repository.
  commands = _commands(block.code)
  assert commands, f"{block.where}: no command"
  for words in commands:
    try:
      _check_command(words)
    except Exception as e:  # pylint: disable=broad-except  # Any: a flag or config error.
      pytest.fail(f"{block.where}: {shlex.join(words)}\n  {type(e).__name__}: {e}")


def test_every_code_block_is_checked():
  """Each code block is a checked ```sh block, a ```python snippet that
  tests/test_export_snippets.py runs, output (no language, or text), or marked no-check."""
  unchecked = [b.where for b in BLOCKS
               if not (b.language in ("sh", "", "text") or b.skip_reason
                       or (b.language == "python" and SNIPPET.match(b.before)))]
  assert not unchecked, unchecked


def test_a_broken_command_is_caught(monkeypatch):
  """The shell check refuses an unknown flag, a bad flag value, a missing flagfile, a
  settings mistake, an unknown binary and an unknown make target."""
  monkeypatch.chdir(REPO)
  for command, says in (
      ("python -m tff_sam.experiments.run --no_such_flag=1", "no_such_flag"),
      ("python -m tff_sam.experiments.predict --rounds=2", "rounds"),  # run's, not predict's.
      ("python -m tff_sam.experiments.run --rounds=many", "rounds"),
      ("python -m tff_sam.experiments.compare --flagfile=experiments/missing.flags",
       "missing.flags"),
      ("python -m tff_sam.experiments.run --rounds=-1", "rounds"),
      ("python -m tff_sam.experiments.compare --seeds=0", "seeds"),
      ("python -m tff_sam.experiments.segment --model=mobile_sam", "input"),
      ("python -m tff_sam.experiments.train", "no binary"),
      ("python tools/no_such_tool.py", "no script"),
      ("make no-such-target", "no target"),
      ("make demo GPUS=1", "no variable"),
      ("pip install tff_sam", "no check")):
    with pytest.raises(Exception, match=says):
      _check_command(shlex.split(command))
  _check_command(shlex.split("python -m tff_sam.experiments.run --rounds=2 --noclipping "
                             "--flagfile=experiments/demo_lora.flags"))
  _check_command(shlex.split("make install GPU=1"))


def test_no_check_marks_the_next_block(tmp_path):
  """`<!-- no-check: REASON -->` right above a block is its skip reason; a block
  without it has none, and so has a block below a snippet mark."""
  page = tmp_path / "page.md"
  page.write_text("<!-- no-check: D is a placeholder -->\n```sh\nrun D\n```\n\n```sh\nmake demo\n```\n"
                  "<!-- snippet: x -->\n```python\nmask = 1\n```\n")
  blocks = _blocks(page)
  assert [(b.language, b.line, b.skip_reason) for b in blocks] == [
      ("sh", 2, "D is a placeholder"), ("sh", 6, None), ("python", 10, None)]
  assert _commands("make demo  # comment\n# a comment line\npython -m a \\\n  --b=1 \\\n  --c\n") == [
      ["make", "demo"], ["python", "-m", "a", "--b=1", "--c"]]


# ---------------------------------------------------------------- the flags page


def test_flags_page_is_generated_from_the_flags():
  """docs/flags.md is what tools/flags_doc.py writes from the binaries' flag definitions."""
  expected = flags_doc.markdown()
  actual = FLAGS_PAGE.read_text()
  if actual != expected:
    diff = "\n".join(list(difflib.unified_diff(actual.splitlines(), expected.splitlines(),
                                               "docs/flags.md", "the flags", lineterm=""))[:40])
    pytest.fail(f"docs/flags.md differs from the flags: run `python tools/flags_doc.py`\n{diff}")


def test_flags_page_lists_every_binary_and_flag():
  """Every binary has its section, and every flag of run (the one with topics) is in it
  once: a flag added to run but to none of `run.HELP_GROUPS` still shows."""
  page = FLAGS_PAGE.read_text()
  for name in flags_doc.binaries():
    assert f"\n## {name}\n" in page, name
  with flags_doc.fresh_binary("run"):
    names = [f.name for module_flags in flags_doc.own_flags().values() for f in module_flags]
  run_section = page.split("\n## run\n")[1].split("\n## ")[0]
  for name in names:
    assert len(re.findall(rf"`--(?:\[no\])?{name}`", run_section)) == 1, name


# ---------------------------------------------------------------- links


def _slug(heading: str) -> str:
  """GitHub's anchor of a heading: lowercase, punctuation but `-` and `_` dropped,
  spaces to hyphens."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _without_code_blocks(text: str) -> str:
  """`text` without its fenced code blocks (whose `#` lines are no headings)."""
  return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchors(page: Path) -> set[str]:
  """The anchors of a page's headings (a repeated one gets -1, -2, ... as on GitHub)."""
  anchors, seen = set(), {}
  text = _without_code_blocks(page.read_text())
  for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
    slug = _slug(heading)
    anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
    seen[slug] = seen.get(slug, 0) + 1
  return anchors


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _links(page: Path) -> list[str]:
  """The targets of the page's links and pictures, outside code blocks and code spans."""
  return LINK.findall(re.sub(r"`[^`]+`", "", _without_code_blocks(page.read_text())))


def test_relative_links_and_pictures_resolve():
  """Every relative link and picture of README.md and docs/*.md names an existing file
  or folder, and an anchor names a heading of that page."""
  broken = []
  for page in PAGES:
    for target in _links(page):
      if re.match(r"[a-z]+:", target):  # https:, mailto:
        continue
      path, _, anchor = target.partition("#")
      resolved = (page.parent / path).resolve() if path else page
      if not resolved.exists():
        broken.append(f"{page.name}: {target} (no such file)")
      elif anchor and anchor not in _anchors(resolved):
        broken.append(f"{page.name}: {target} (no heading #{anchor} in {resolved.name})")
  assert not broken, "\n".join(broken)


def test_a_broken_link_is_caught(tmp_path):
  """The anchors are GitHub's: punctuation dropped, hyphens kept, repeats numbered."""
  page = tmp_path / "page.md"
  page.write_text("# LoRA in the image encoder (`--adapter=lora`)\n\n```sh\n# not a heading\n```\n"
                  "## Data\n## Data\n## Beyond training: server optimizers, ...\n")
  assert _anchors(page) == {"lora-in-the-image-encoder---adapterlora", "data", "data-1",
                            "beyond-training-server-optimizers-"}
  page.write_text("[a](missing.md) `[b](in-code.md)` ![c](pic.png)\n")
  assert _links(page) == ["missing.md", "pic.png"]


def test_readme_links_every_docs_page():
  """README's table of contents reaches every page of docs/."""
  linked = {(REPO / target.partition("#")[0]).resolve() for target in _links(REPO / "README.md")}
  assert not [p.name for p in PAGES[1:] if p.resolve() not in linked]
