"""The package's shape, checked from its source: the rules of docs/layout.md.

* imports point down the layers of `LAYERS` (docs/layout.md states the same
  order): a module imports only from its own layer or lower ones;
* no import cycle between `tff_sam` modules;
* no module over `MAX_LINES` lines;
* no two modules define a public top-level function or class of the same name;
* absl flags are defined only in `tff_sam/experiments/` (`runtime` parses them);
* imports sit at module top; an import inside a function says why in a `# lazy:`
  comment on its line or on the line above its group of import lines.
"""

import ast
import collections
from pathlib import Path
from typing import Optional

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tff_sam"
MAX_LINES = 600


def _modules() -> dict[str, Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


MODULES = _modules()

# docs/layout.md, lowest layer first: a module may import from its own layer and
# the ones before it, never from a later one. A layer is a list of module prefixes.
LAYERS = (
    ("top-level", ("tff_sam.config", "tff_sam.errors", "tff_sam.fileio",
                   "tff_sam.output_folder", "tff_sam.registry", "tff_sam.runtime",
                   "tff_sam.terminal")),
    ("models", ("tff_sam.models",)),
    ("data", ("tff_sam.data",)),
    ("evaluation", ("tff_sam.evaluation",)),
    ("export", ("tff_sam.export",)),
    ("federated.learning", ("tff_sam.federated.learning",)),
    ("federated.backends", ("tff_sam.federated.backends",)),
    ("federated.program", ("tff_sam.federated.program",)),
    ("bench", ("tff_sam.bench",)),
    ("experiments", ("tff_sam.experiments",)),
)
# Packages above the layers: their `__init__` holds no code (`test_package_inits_hold_no_code`).
PACKAGE_ROOTS = ("tff_sam", "tff_sam.federated")


def _resolve(module: str, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  base = module.split(".")
  is_package = MODULES[module].name == "__init__.py"
  base = base if is_package else base[:-1]
  base = base[:len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _imported(module: str, tree: ast.AST) -> set[str]:
  """`tff_sam` modules that `module` imports (anywhere in its source)."""
  out = set()
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = _resolve(module, node)
      names = [base] + [f"{base}.{a.name}" for a in node.names]
    for name in names:
      if name in MODULES and name != module:
        out.add(name)
  return out


def _trees() -> dict[str, ast.AST]:
  return {m: ast.parse(p.read_text(), filename=str(p)) for m, p in MODULES.items()}


def import_graph() -> dict[str, set[str]]:
  return {m: _imported(m, t) for m, t in _trees().items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  counter = [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in graph:
    if v not in index:
      visit(v)
  return out


def _layer(module: str) -> Optional[int]:
  """The index in `LAYERS` of `module`'s layer, None if it is in none."""
  for i, (_, prefixes) in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return i
  return None


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
  """Each import of a module from a later layer than its own, as one line.

  A package itself (its `__init__`, which holds no code) does not count: `from
  tff_sam.data import prompts` is reported once, as the import of `tff_sam.data.prompts`.
  """
  out = []
  for module in sorted(graph):
    mine = _layer(module)
    for name in sorted(graph[module]):
      if name in MODULES and MODULES[name].name == "__init__.py":
        continue
      theirs = _layer(name)
      if mine is not None and theirs is not None and theirs > mine:
        out.append(f"{module} (layer {LAYERS[mine][0]}) imports {name} "
                   f"(layer {LAYERS[theirs][0]}, above it)")
  return out


def test_layer_checker_finds_an_upward_import():
  graph = {"tff_sam.models.decoder": {"tff_sam.data", "tff_sam.data.prompts", "tff_sam.errors"},
           "tff_sam.data.prompts": {"tff_sam.models.sam"}}
  assert _upward_imports(graph) == [
      "tff_sam.models.decoder (layer models) imports tff_sam.data.prompts (layer data, above it)"]


def test_every_module_is_in_a_layer():
  unplaced = [m for m in MODULES if m not in PACKAGE_ROOTS and _layer(m) is None]
  assert not unplaced, f"modules in no layer of LAYERS (and docs/layout.md): {unplaced}"


def test_imports_point_down_the_layers():
  upward = _upward_imports(import_graph())
  assert not upward, ("imports against the layers of docs/layout.md (a module imports only "
                      "from its own layer or lower ones):\n" + "\n".join(upward))


def test_cycle_finder_finds_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
  # Packages' __init__ modules import nothing of the package, so edges are real.
  assert _cycles(import_graph()) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
  lines = len(MODULES[module].read_text().splitlines())
  assert lines <= MAX_LINES, f"{module} has {lines} lines"


def test_public_names_are_unique():
  owners = collections.defaultdict(list)
  for module, tree in _trees().items():
    for node in tree.body:
      if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
          and not node.name.startswith("_") and not module.startswith("tff_sam.experiments")):
        owners[node.name].append(module)
  shared = {name: mods for name, mods in owners.items() if len(mods) > 1}
  assert not shared


def test_flags_only_in_binaries():
  """Flags are defined only in binaries; besides them only `runtime`, which parses the
  command line for them (`runtime.parse_flags`), imports absl's flags."""
  for module, path in MODULES.items():
    if module.startswith("tff_sam.experiments"):
      continue
    text = path.read_text()
    assert "flags.DEFINE" not in text, module
    assert "absl import flags" not in text or module == "tff_sam.runtime", module


def _imports_in_functions(tree: ast.AST) -> list[ast.AST]:
  out = []
  for scope in ast.walk(tree):
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
      out += [n for n in ast.walk(scope) if isinstance(n, (ast.Import, ast.ImportFrom))]
  return list({id(n): n for n in out}.values())


def test_function_level_imports_say_why():
  unexplained = []
  for module, path in MODULES.items():
    lines = path.read_text().splitlines()
    for node in _imports_in_functions(ast.parse("\n".join(lines))):
      here = lines[node.lineno - 1]
      first = node.lineno - 1  # the group of import lines this one belongs to
      while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
        first -= 1
      above = lines[first - 1] if first > 0 else ""
      if "# lazy:" not in here and "# lazy:" not in above:
        unexplained.append(f"{module}:{node.lineno}: {here.strip()}")
  assert not unexplained, "\n".join(unexplained)


def test_package_inits_hold_no_code():
  for module, path in MODULES.items():
    if path.name != "__init__.py":
      continue
    tree = ast.parse(path.read_text())
    body = [n for n in tree.body
            if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
            and not (isinstance(n, ast.Assign) and [t.id for t in n.targets] == ["__version__"])]
    assert not body, f"{module}: keep __init__.py to a docstring"
