"""The layering a newcomer relies on (docs/architecture.md): the Ray-free core imports nothing of the
rest, run integrity and configs import no Ray wiring, and the CPU steps start without torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_packages(folder: str) -> dict[str, set[str]]:
    """Per module under `folder`, the top-level packages of this repository it imports."""
    ours = {"core", "storage", "configs", "actors", "ray_jobs", "ray"}
    out = {}
    for path in (REPO / folder).rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found |= {n.split(".")[0] for n in names} & ours
        out[str(path.relative_to(REPO))] = found
    return out


@pytest.mark.parametrize(
    "folder, allowed",
    [("core", {"core"}), ("storage", {"core", "storage", "configs"}), ("configs", {"core", "storage", "configs"})],
)
def test_each_layer_imports_only_the_layers_below_it(folder, allowed):
    wrong = {module: found - allowed for module, found in imported_packages(folder).items() if found - allowed}
    assert wrong == {}


def test_the_cpu_steps_start_without_torch():
    """Their workers start in a fraction of a second (the label step's actors and the model's load torch)."""
    code = "import sys, actors.extract, actors.feature_reader, actors.score; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
