"""Every notebook in notebooks/ runs top to bottom without an error (the walkthroughs stay true).

Each notebook is executed in a fresh kernel with notebooks/ as the working directory, as a reader
would run it; outputs are not written back.
"""

import re
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


# ---- citations of the paper ---------------------------------------------------------------------
# A notebook's markdown may cite the paper's sections, equations, algorithms, tables, figures and
# appendices only as the README's "Paper map" lists them, so that a reader can find each in the code.
# A notebook's own sections are written "section N above / below" (lower case), which is not a citation.

README = Path(__file__).resolve().parent.parent / "README.md"
_KINDS = {"Eq": "Eq", "Eqs": "Eq", "Equation": "Eq", "Equations": "Eq", "Table": "Table", "Tables": "Table",
          "Fig": "Fig", "Figs": "Fig", "Figure": "Fig", "Figures": "Fig", "Alg": "Alg", "Algs": "Alg",
          "Algorithm": "Alg", "Sec": "Sec", "Secs": "Sec", "Section": "Sec", "Sections": "Sec", "§": "Sec",
          "App": "App", "Appendix": "App"}
_LABEL = {"Eq": "Eq.", "Table": "Table", "Fig": "Fig.", "Alg": "Alg.", "Sec": "Sec.", "App": "App."}
_NUM = r"(?:\d+(?:\.\d+)*|[A-Z](?:\.\d+)*\b)"
_CITATION = re.compile(r"(?<![A-Za-z])(Eqs?\.|Equations?|Tables?|Figs?\.|Figures?|Algs?\.|Algorithm|Secs?\.|Sections?|§|App\.|Appendix)"
                       rf"\s*({_NUM}(?:\s*(?:,|and|[-–])\s*{_NUM})*)(?!\s+(?:above|below|of this notebook))")


def citations(text: str) -> set[str]:
    """{"Eq. 8", "Sec. 4.2", "App. F.1", ...} cited in text; integer ranges such as "Eqs. 10-12" are expanded."""
    found = set()
    for m in _CITATION.finditer(text):
        kind = _LABEL[_KINDS[m.group(1).rstrip(".")]]
        nums = re.findall(_NUM, m.group(2))
        seps = re.findall(r"\s*(,|and|[-–])\s*", re.sub(_NUM, " ", m.group(2)))
        found.update(f"{kind} {n}" for n in nums)
        for (a, b), sep in zip(zip(nums, nums[1:]), seps):
            if sep in "-–" and a.isdigit() and b.isdigit():
                found.update(f"{kind} {k}" for k in range(int(a), int(b) + 1))
    return found


def paper_map(readme: str) -> set[str]:
    """The citations listed in the first column of the README's "## Paper map" table."""
    section = readme.split("\n## Paper map\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| ") and not line.startswith("| paper ")]
    return set().union(*(citations(cell) for cell in rows))


def unlisted(markdown: str, listed: set[str]) -> set[str]:
    return citations(markdown) - listed


def test_paper_map_parses():
    listed = paper_map(README.read_text())
    for key in ("Eq. 8", "Eq. 11", "Eq. 27", "Alg. 2", "Table 1", "Fig. 9", "Sec. 6", "Sec. 4.2", "App. F.1", "Eq. 3"):
        assert key in listed, f"README paper map should list {key}"


def test_citation_check_catches_a_bad_citation():
    listed = paper_map(README.read_text())
    good = "Eq. 8 gives the score; Eqs. 10–12 convert the path (§4.3, App. B Prop. 1), Alg. 2 and Fig. 9; Table 1 (v5)."
    assert citations(good) >= {"Eq. 8", "Eq. 10", "Eq. 11", "Eq. 12", "Sec. 4.3", "App. B", "Alg. 2", "Fig. 9", "Table 1"}
    assert unlisted(good, listed) == set()
    bad = "As Eq. 99 shows (Table 42, Fig. 77, Alg. 9, Sec. 12, App. Z), and Eqs. 29-31."
    assert unlisted(bad, listed) == {"Eq. 99", "Table 42", "Fig. 77", "Alg. 9", "Sec. 12", "App. Z", "Eq. 29", "Eq. 31"}
    assert unlisted("see section 3 above and Sec. 1 below", listed) == set()  # a notebook's own sections


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_citations_are_in_the_paper_map(path):
    listed = paper_map(README.read_text())
    nb = nbformat.read(path, as_version=4)
    bad = {(i, c) for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
           for c in unlisted(cell.source, listed)}
    assert not bad, (f"{path.name}: markdown cites paper numbers missing from the README's paper map "
                     f"(cell, citation): {sorted(bad)}; add them to the map or fix the citation")
