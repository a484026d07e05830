"""The notebooks in notebooks/ run top to bottom on the CPU (with DOE_EXT_QUICK=1, their small
sizes) in a kernel of this interpreter, and are committed without outputs."""
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_the_five_notebooks_are_there():
    assert [p.stem for p in NOTEBOOKS] == ["01_ops", "02_stage1_lda", "03_doe_training", "04_dmoe", "05_hf_dropin"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), \
        f"{path.name} has outputs: strip them (jupyter nbconvert --clear-output --inplace {path})"
    assert "QUICK" in code[0].source, "the first code cell holds the parameters (QUICK)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, tmp_path, monkeypatch):
    import sys

    from jupyter_client.kernelspec import KernelSpecManager

    monkeypatch.setenv("DOE_EXT_QUICK", "1")
    book = nbformat.read(path, as_version=4)
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve() or spec.argv[0] == "python", spec.argv
    # a cell that raises fails the test with the cell and its traceback; the timeout only guards a hang
    nbclient.NotebookClient(book, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert outputs and not [o for o in outputs if o.output_type == "error"]
    for cell in book.cells:  # a cell that ends in a plot helper shows the figure inline
        if cell.cell_type == "code" and re.search(r"^plot_\w+\(", cell.source, re.M):
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source
