"""Every notebook in notebooks/ runs top to bottom without an error (the walkthroughs stay true).

Each notebook is executed in a fresh kernel with notebooks/ as the working directory, as a reader
would run it; outputs are not written back.
"""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ should hold the walkthroughs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_notebooks_show_their_figures(path):
    """A reader opening a notebook in a plain viewer sees every figure: each stored code cell that
    draws (calls plt.show()) carries an image output."""
    nb = nbformat.read(path, as_version=4)
    missing = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and "plt.show()" in cell.source
               and not any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))]
    assert not missing, f"{path.name}: code cells {missing} draw but have no stored image; re-execute the notebook in place"
