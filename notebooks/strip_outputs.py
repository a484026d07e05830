"""Clear every code cell's outputs and execution count, so the notebooks commit without outputs
(``make test`` checks it): ``.venv/bin/python notebooks/strip_outputs.py [notebooks/*.ipynb]``."""
import sys
from pathlib import Path

import nbformat


def strip(path: Path) -> bool:
    book = nbformat.read(path, as_version=4)
    changed = False
    for cell in book.cells:
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            cell.outputs, cell.execution_count, changed = [], None, True
    if changed:
        nbformat.write(book, path)
    return changed


if __name__ == "__main__":
    paths = [Path(p) for p in sys.argv[1:]] or sorted(Path(__file__).parent.glob("*.ipynb"))
    for p in paths:
        print(("stripped " if strip(p) else "clean    ") + str(p))
