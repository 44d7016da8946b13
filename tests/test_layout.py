"""The package layout: no import cycle, no path computed from the package's own location, every module importable."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nrfm"
STAGES = ("data", "synth", "models", "ssl", "train", "eval", "plots", "pipeline", "bench")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _top_level_nrfm_imports(path: Path) -> set[str]:
    """Modules of nrfm imported at module level (function-local imports are deliberate and commented)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("nrfm")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("nrfm"):
            for alias in node.names:  # `from nrfm.x import y` names module nrfm.x.y when y is a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return found


def test_stage_subpackages_exist():
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage


def test_no_import_cycle():
    graph = {name: _top_level_nrfm_imports(path) & set(MODULES) for name, path in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_function_local_imports_say_why():
    """A function-local import of nrfm (or of a heavy optional dependency) carries a comment saying why."""
    missing = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("nrfm") and inner.level == 0:
                    # the reason is a comment on the import or above the run of imports it belongs to
                    i = inner.lineno - 1
                    while i > 0 and "#" not in lines[i] and lines[i - 1].strip().startswith(("from ", "import ")):
                        i -= 1
                    if "#" not in lines[i] and not lines[i - 1].strip().startswith("#"):
                        missing.append(f"{path.relative_to(ROOT)}:{inner.lineno}: {lines[inner.lineno - 1].strip()}")
    assert not missing, "function-local nrfm imports without a reason:\n" + "\n".join(sorted(set(missing)))


def test_no_path_from_the_package_location():
    """Workspace paths never derive from where the package lives (only importlib.resources finds package data)."""
    offenders = [f"{p.relative_to(ROOT)}" for p in PACKAGE.rglob("*.py")
                 if "__file__" in p.read_text() or "parent.parent" in p.read_text()]
    assert not offenders, offenders


def test_no_module_over_the_size_limit():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(n for n in MODULES if not n.endswith("__main__"))
    code = "import importlib\nfor n in %r:\n    importlib.import_module(n)\n" % names
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
