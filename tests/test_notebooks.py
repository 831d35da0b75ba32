"""The quickstart notebook runs top to bottom on CPU without a cell error."""

import os
import sys
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from nbclient import NotebookClient

ROOT = Path(__file__).parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_quickstart.ipynb"


class _ThisInterpreter(KernelSpecManager):
    """Resolves "python3" to a kernel of the running interpreter: nothing is registered globally."""

    def get_kernel_spec(self, kernel_name):
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        return KernelSpec(argv=argv, display_name="python3", language="python", resource_dir=".")


def test_quickstart_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel runs in tmp_path: put this checkout first on its path, as pytest does for the tests.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        kernel_manager_kwargs={"kernel_spec_manager": _ThisInterpreter()},
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=env)  # raises CellExecutionError naming the cell on any error
    assert (tmp_path / "quickstart-run" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "quickstart-run" / "loss.png").is_file()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss plot
