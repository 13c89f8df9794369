"""Writes docs/flags.md: every binary's flags, from the binaries' own flag definitions.

    python tools/flags_doc.py [OUTPUT]

OUTPUT defaults to docs/flags.md. Each binary of `tff_sam/experiments/` (a module that
runs `app.run` as `__main__`) is imported afresh on its own, so only its flags and
those of the modules it imports from `tff_sam/experiments/` are defined (binaries
define some of the same names, e.g. `--model`); absl's record of which module defined
which flag (`FLAGS.flags_by_module_dict()`) then gives the binary's flags. `run` (and
`compare`, which takes every flag of run) lists them by the topics of its `--help`
(`run.HELP_GROUPS`); other binaries by defining module, in definition order. The output
depends on nothing but the source, so `tests/test_docs.py` regenerates it and compares.
"""

import contextlib
import importlib
from pathlib import Path
import sys
from types import ModuleType
from typing import Iterator

from absl import flags
from absl.testing import flagsaver

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "flags.md"
PACKAGE = "tff_sam.experiments"
PACKAGE_DIR = REPO / "tff_sam" / "experiments"
# Listed first; the other binaries follow by name.
FIRST = ("run", "compare")
COMMAND = "python tools/flags_doc.py"

FLAGS = flags.FLAGS

PREAMBLE = f"""# Flags

Every flag of every binary, with its default. Generated from the binaries' own flag
definitions by `{COMMAND}`; do not edit (`tests/test_docs.py` fails when this page
and the flags differ).

Every flag is documented by `python -m tff_sam.experiments.run --help` (every binary
answers `--help`); flags can be kept in a file and passed with `--flagfile` (see
`experiments/`). A flag mistake is answered at once, before TensorFlow loads (about 0.1 s
instead of 7): one `error:` line naming the flag, exit code 1. absl's own flags
(`--flagfile`, `-v`, `--helpfull`, ...) are accepted by every binary and not listed
here. A boolean flag `--name` is switched off with `--noname`.
"""


def binaries() -> list[str]:
  """The binaries' module names in `tff_sam/experiments/`, in the page's order."""
  names = sorted(p.stem for p in PACKAGE_DIR.glob("*.py")
                 if 'if __name__ == "__main__":' in p.read_text())
  return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]


def _forget_binaries() -> None:
  """Drops every `tff_sam.experiments.*` module, so the next import runs it again."""
  package = importlib.import_module(PACKAGE)
  for loaded in [m for m in sys.modules if m.startswith(PACKAGE + ".")]:
    sys.modules.pop(loaded)
    package.__dict__.pop(loaded.rsplit(".", 1)[1], None)  # `from PACKAGE import run`


@contextlib.contextmanager
def fresh_binary(name: str) -> Iterator[ModuleType]:
  """`tff_sam.experiments.<name>` imported afresh, with only its own flags defined.

  absl's `flagsaver` removes the flags the import defined (and restores every other
  flag's value) on exit, so binaries that define the same flag names can be loaded one
  after another in one process.

  Args:
    name: The binary's module name, e.g. `run`.

  Yields:
    The freshly imported module.
  """
  with flagsaver.flagsaver():
    _forget_binaries()
    try:
      yield importlib.import_module(f"{PACKAGE}.{name}")
    finally:
      _forget_binaries()


def own_flags() -> dict[str, list[flags.Flag]]:
  """Defining module -> its flags, for the modules of `tff_sam/experiments/` loaded now
  (absl keeps an empty list for a module whose flags were removed)."""
  return {module: flag_list for module, flag_list in FLAGS.flags_by_module_dict().items()
          if module.startswith(PACKAGE + ".") and flag_list}


def _escape(text: str) -> str:
  """`text` for one markdown table cell."""
  text = " ".join(text.split())
  for char in ("\\", "|", "*", "<", ">"):
    text = text.replace(char, "\\" + char)
  return text


def _default(flag: flags.Flag) -> str:
  if flag.default is None:
    return "(none)"
  if isinstance(flag.default, bool):
    return f"`{str(flag.default).lower()}`"
  if isinstance(flag.default, (list, tuple)):
    return f"`{','.join(map(str, flag.default))}`" if flag.default else "(empty)"
  return f"`{flag.default}`" if str(flag.default) else "(empty)"


def _kind(flag: flags.Flag) -> str:
  values = getattr(flag.parser, "enum_values", None)
  if values:
    return "one of " + ", ".join(f"`{v}`" for v in values)
  return flag.flag_type()


def _help(flag: flags.Flag) -> str:
  """The flag's help text, without the `<a|b>: ` absl puts before an enum's (the type
  column lists the values)."""
  values = getattr(flag.parser, "enum_values", None)
  prefix = f"<{'|'.join(values)}>: " if values else ""
  return flag.help[len(prefix):] if prefix and flag.help.startswith(prefix) else flag.help


def _table(flag_list: list[flags.Flag]) -> list[str]:
  lines = ["| flag | type | default | what it does |", "|---|---|---|---|"]
  for flag in flag_list:
    name = f"`--[no]{flag.name}`" if flag.boolean else f"`--{flag.name}`"
    lines.append(f"| {name} | {_kind(flag)} | {_default(flag)} | {_escape(_help(flag))} |")
  return lines


def _takes_runs_flags(name: str) -> bool:
  """Whether binary `name` (loaded now) takes every flag of `run` (as `compare` does)."""
  return name != "run" and f"{PACKAGE}.run" in own_flags()


def _sections(name: str, module: ModuleType) -> list[tuple[str, list[flags.Flag]]]:
  """(title, flags) of binary `name`: its help topics, then flags of no topic by module
  (without run's topics when it takes them all: the page lists them under run)."""
  by_module = own_flags()
  if _takes_runs_flags(name):
    runs = {n for _, names in sys.modules[f"{PACKAGE}.run"].HELP_GROUPS for n in names}
    by_module = {m: [f for f in flag_list if f.name not in runs]
                 for m, flag_list in by_module.items()}
  mine = {f.name: f for flag_list in by_module.values() for f in flag_list}
  groups = list(getattr(module, "HELP_GROUPS", ()))
  sections = [(title, [mine[n] for n in names]) for title, names in groups]
  listed = {f.name for _, flag_list in sections for f in flag_list}
  ordered = sorted(by_module, key=lambda m: (m != f"{PACKAGE}.{name}", m))
  for defining in ordered:
    rest = [f for f in by_module[defining] if f.name not in listed]
    if rest:
      path = defining.replace(".", "/") + ".py"
      title = "flags" if defining == f"{PACKAGE}.{name}" else f"flags of `{path}`"
      sections.append((title if not groups else f"other {title}", rest))
  return sections


def binary_markdown(name: str) -> list[str]:
  """The page's section on binary `name`."""
  with fresh_binary(name) as module:
    summary = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
    lines = [f"## {name}", "", f"`python -m {PACKAGE}.{name}`: {summary}", ""]
    if _takes_runs_flags(name):
      lines += ["It takes every flag of [run](#run), and these:", ""]
    for title, flag_list in _sections(name, module):
      lines += [f"**{title}**", "", *_table(flag_list), ""]
  return lines


def markdown() -> str:
  """The whole page."""
  names = binaries()
  lines = [PREAMBLE, "Binaries: " + ", ".join(f"[{n}](#{n})" for n in names) + ".", ""]
  for name in names:
    lines += binary_markdown(name)
  return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
  if len(argv) > 2:
    print(__doc__, file=sys.stderr)
    return 1
  out = Path(argv[1]) if len(argv) == 2 else OUTPUT
  out.write_text(markdown())
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(REPO))  # The repository's tff_sam, wherever it is run from.
  sys.exit(main(sys.argv))
