"""Every notebook runs top to bottom (on tiny local models), as a user would run it."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qlora_sft.ipynb", "gguf_export.ipynb"])
def test_notebook_runs(name, tmp_path):
    book = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                   extra_arguments=[]).execute()
    outputs = "".join(o.get("text", "") for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "Traceback" not in outputs
