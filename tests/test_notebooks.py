"""The quickstart notebook runs top to bottom on CPU without a cell error (needs the notebook extras: nbformat,
nbclient, ipykernel; skipped without them)."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_quickstart.ipynb"


def this_interpreter():
    """A kernel spec manager that resolves "python3" to a kernel of the running interpreter: nothing is registered
    globally."""
    kernelspec = pytest.importorskip("jupyter_client.kernelspec", reason="needs the notebook extras (jupyter_client)")

    class ThisInterpreter(kernelspec.KernelSpecManager):
        def get_kernel_spec(self, kernel_name):
            argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
            return kernelspec.KernelSpec(argv=argv, display_name="python3", language="python", resource_dir=".")

    return ThisInterpreter()


def run_notebook(path: Path, cwd: Path):
    """Executes the notebook at ``path`` in ``cwd`` on CPU with this checkout first on its path; returns it with its
    outputs. Raises CellExecutionError naming the cell on any error."""
    nbformat = pytest.importorskip("nbformat", reason="needs the notebook extras (nbformat)")
    nbclient = pytest.importorskip("nbclient", reason="needs the notebook extras (nbclient)")
    nb = nbformat.read(path, as_version=4)
    # The kernel runs in cwd: put this checkout first on its path, as pytest does for the tests.
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        kernel_manager_kwargs={"kernel_spec_manager": this_interpreter()},
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute(env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath})
    return nb


def test_quickstart_runs(tmp_path):
    nb = run_notebook(NOTEBOOK, tmp_path)
    assert (tmp_path / "quickstart-run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "quickstart-run" / "loss.png").is_file()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss plot
