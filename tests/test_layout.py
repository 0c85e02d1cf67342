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


def module_imports(path: Path) -> set[str]:
    """The modules of this repository that importing `path` runs first: every `from x import ...`
    and `import x` at module level, with each package `__init__` on the way."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            parts = name.split(".")
            found |= {".".join(parts[: i + 1]) for i in range(len(parts))}
    return found


def test_core_has_no_import_cycle():
    """A cycle imports fine in one order and fails in another (a bench importing core.labelling.assign
    first once did), so no test order can be trusted to catch it: the module graph is checked instead."""
    graph = {}
    for path in (REPO / "core").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = module_imports(path)
    # a module's own packages are initialised before it, whatever it imports
    graph = {
        name: {m for m in deps if m in graph and not (name + ".").startswith(m + ".")} for name, deps in graph.items()
    }
    state: dict[str, str] = {}

    def cycle_from(name, stack):
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                return stack + [name, dep]
            if dep not in state and (found := cycle_from(dep, stack + [name])):
                return found
        state[name] = "done"
        return None

    cycles = [c for name in sorted(graph) if name not in state and (c := cycle_from(name, []))]
    assert cycles == []
