"""What the Colab notebooks (notebooks/*.ipynb) share beyond their first cell.

The first cell of every notebook fetches and installs the project, so it cannot
import it (it also defines ``TINY`` from ``ENERGYFLOW_TINY=1``, which the test
suite sets); everything after it may.
"""
from __future__ import annotations


class CellOrderError(RuntimeError):
    """A notebook cell ran before the cell that defines what it uses."""


def require(namespace: dict, **names: str) -> None:
    """Stop a cell that needs `name` from the cell titled `names[name]` when that
    cell has not run, saying which to run: require(globals(), report="2. Train")."""
    missing = {cell: name for name, cell in names.items() if name not in namespace}
    if missing:
        cells = "; ".join(f"run the cell '{cell}' first (it defines {name})"
                          for cell, name in missing.items())
        raise CellOrderError(f"This cell uses results of an earlier cell: {cells}.")
