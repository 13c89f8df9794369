"""The Colab notebook (notebooks/colab_simulation.ipynb): its structure, and a headless
top-to-bottom run of it in the smallest configuration.

The executed run uses `TFF_SAM_NOTEBOOK_CONFIG=smoke` (tiny random-init SAM on the
generated shapes, 1 round, no downloads), an output folder and a cache under
`tmp_path`, and a `python3` kernel of the Python running pytest (the project's venv).
Outside Colab the notebook skips its Colab-only cells and runs the project's programs
with the checkout's `.venv/bin/python`.
"""

import json
import math
import re
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_simulation.ipynb"

# Code that must only run in Colab: the `google.colab` module and uv's Python installs.
_COLAB_ONLY = re.compile(r"google\.colab|\buv\W+python\b")
_IN_COLAB_DEFINITION = re.compile(r"^\s*IN_COLAB\s*=", re.M)
_IN_COLAB_GUARD = re.compile(r"^\s*(if|elif)\s+IN_COLAB\b.*:\s*(#.*)?$")


def _read():
  return nbformat.read(str(NOTEBOOK), as_version=4)


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def _unguarded_lines(source: str) -> list:
  """Lines that use Colab-only code outside an `if IN_COLAB...:` block."""
  lines = source.splitlines()
  bad = []
  for i, line in enumerate(lines):
    if not _COLAB_ONLY.search(line) or _IN_COLAB_DEFINITION.match(line):
      continue
    guarded, depth = False, _indent(line)
    for above in reversed(lines[:i]):  # the enclosing blocks, innermost first
      if not above.strip() or _indent(above) >= depth:
        continue
      depth = _indent(above)
      if _IN_COLAB_GUARD.match(above):
        guarded = True
        break
    if not guarded:
      bad.append(line.strip())
  return bad


def test_guard_check_itself():
  assert _unguarded_lines('from google.colab import files\n')
  assert _unguarded_lines('if IN_COLAB:\n    pass\nelse:\n    run(["uv", "python", "find"])\n')
  assert not _unguarded_lines('IN_COLAB = "google.colab" in sys.modules\n')
  assert not _unguarded_lines(
      'if IN_COLAB and X:\n    from google.colab import drive\n    for a in b:\n'
      '        run([sys.executable, "-m", "uv", "python",\n             "install"])\n')


def test_notebook_is_clean_and_colab_cells_are_guarded():
  nb = _read()
  nbformat.validate(nb)
  assert nb.nbformat == 4
  assert nb.metadata.kernelspec.name == "python3"
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and any(c.cell_type == "markdown" for c in nb.cells)
  for cell in code:
    assert cell.outputs == [], f"saved outputs in cell:\n{cell.source[:200]}"
    assert cell.execution_count is None
  sources = [c.source for c in code]
  assert any(_IN_COLAB_DEFINITION.search(s) and '"google.colab" in sys.modules' in s
             for s in sources)
  colab_cells = [s for s in sources if _COLAB_ONLY.search(s)]
  assert any(re.search(r"\buv\W+python\W+install\W+3\.11", s) for s in colab_cells)
  assert any("google.colab import files" in s for s in colab_cells)
  for source in colab_cells:
    assert not _unguarded_lines(source), f"not guarded by `if IN_COLAB`: {_unguarded_lines(source)}"
  run_cells = [s for s in sources if "tff_sam.experiments.run" in s and "--fresh" in s]
  assert run_cells, "the simulation cell must pass --fresh"


@pytest.mark.slow
def test_notebook_runs_smoke_config(tmp_path, monkeypatch):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top

  out = tmp_path / "run"
  monkeypatch.setenv("TFF_SAM_NOTEBOOK_CONFIG", "smoke")
  monkeypatch.setenv("TFF_SAM_NOTEBOOK_OUTPUT", str(out))
  monkeypatch.setenv("TFF_SAM_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("TFF_SAM_REPO", raising=False)
  # The kernel is this Python (jupyter_client runs a `python3` kernelspec's "python" as
  # sys.executable); its venv's share/jupyter holds ipykernel's spec.
  monkeypatch.setenv("JUPYTER_PATH", str(Path(sys.prefix) / "share" / "jupyter"))
  nb = _read()
  client = NotebookClient(nb, kernel_name="python3", timeout=900, startup_timeout=120,
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()  # raises CellExecutionError on the first failing cell

  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  summary = json.loads((out / "summary.json").read_text())
  assert summary["rounds"] == 1
  # No GPU here: the default execution ran on the CPU and says so.
  texts = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert summary["config"]["execution"] == "tf"
  assert "GPU: none" in texts and "--execution" not in texts
  assert "execution: tf (TFF's compiled rounds run by TensorFlow in this process on the CPU" in texts
  assert any("execution `tf`" in o.get("data", {}).get("text/markdown", "") for o in outputs)
  assert math.isfinite(summary["final"]["dice"])
  png = (out / "metrics.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(out / "metrics.png") as image:
    image.verify()
  assert any("image/png" in o.get("data", {}) for o in outputs)
  assert (out / "predict" / "overlay.png").is_file()
  assert len(list((out / "segment").glob("*_overlay.png"))) == 1  # Section 8: automatic.
  assert (out / "model" / "config.json").is_file()
