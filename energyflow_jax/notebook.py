"""What the Colab notebooks (notebooks/*.ipynb) share beyond their first cell.

The first cell of every notebook fetches and installs the project, so it cannot
import it; everything after it may. ``TINY`` (environment variable
``ENERGYFLOW_TINY=1``, which the test suite sets) shrinks every run to seconds.
"""
from __future__ import annotations

import os


class CellOrderError(RuntimeError):
    """A notebook cell ran before the cell that defines what it uses."""


def tiny() -> bool:
    """True when the notebooks should run at test size (ENERGYFLOW_TINY=1)."""
    return os.environ.get("ENERGYFLOW_TINY", "") == "1"


def require(namespace: dict, **names: str) -> None:
    """Stop a cell that needs `name` from the cell titled `names[name]` when that
    cell has not run, saying which to run: require(globals(), report="2. Train")."""
    missing = {cell: name for name, cell in names.items() if name not in namespace}
    if missing:
        cells = "; ".join(f"run the cell '{cell}' first (it defines {name})"
                          for cell, name in missing.items())
        raise CellOrderError(f"This cell uses results of an earlier cell: {cells}.")
