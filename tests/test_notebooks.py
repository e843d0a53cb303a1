"""The Colab notebooks: stored without outputs, and each runs top to bottom at TINY size.

Executed with nbclient (what nbmake runs) in a kernel started from this
interpreter, with ENERGYFLOW_TINY=1 and this session's environment (the
compilation cache, the two CPU devices). A failing cell fails the test with its
traceback.
"""
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(REPO, "notebooks")) if f.endswith(".ipynb"))


def test_the_four_notebooks_are_there():
    assert NOTEBOOKS == ["01_quickstart.ipynb", "02_metaworld.ipynb", "03_energy_rewards.ipynb",
                         "04_capacity_and_sweeps.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    nb = json.load(open(os.path.join(REPO, "notebooks", name)))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, name
    for i, cell in enumerate(code):
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, \
            f"{name}: code cell {i} holds outputs; strip them (jupyter nbconvert --clear-output)"
    first = "".join(code[0]["source"])
    assert "TINY" in first and "pip" in first and "git" in first, "the first cell installs the project"


def execute(name: str, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("ENERGYFLOW_TINY", "1")
    nb = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.join(REPO, "notebooks")}})
    client.execute()
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    nb = execute(name, tmp_path, monkeypatch)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert images, f"{name} shows no figure"


def test_a_cell_run_out_of_order_says_which_to_run_first():
    from energyflow_jax.notebook import CellOrderError, require

    with pytest.raises(CellOrderError, match="run the cell '1. Train on the toy task' first"):
        require({}, WORKDIR="1. Train on the toy task")
    require({"WORKDIR": "runs/x"}, WORKDIR="1. Train on the toy task")  # defined: no error
