"""The example notebooks run top to bottom in a real kernel (nbclient), without errors."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("anywidget")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "examples").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_example_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    work = tmp_path / path.name
    shutil.copy(path, work)
    nb = nbformat.read(work, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    # nbclient drives the kernel from an event loop that it leaves marked as running in the calling
    # thread (nest-asyncio); run it in a thread of its own so later tests see no running loop
    failure: list[BaseException] = []

    def execute() -> None:
        try:
            client.execute()  # raises CellExecutionError with the traceback on any failing cell
        except BaseException as e:  # noqa: BLE001 - re-raised below, in the test's thread
            failure.append(e)

    worker = threading.Thread(target=execute)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets, "the notebook displays no widget"
