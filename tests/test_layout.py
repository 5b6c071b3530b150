"""The package's shape: imports only go down (no cycles), every module imports on its own in any order,
modules stay readable in size, and git tracks every file under sqltune/.

    pytest tests/test_layout.py
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sqltune"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """sqltune modules that `module` imports anywhere in its body (function-level imports count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and name != "sqltune":
                out.add(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {m: _imports(m, p, set(modules)) for m, p in modules.items()}
    assert sum(len(v) for v in graph.values()) > 50, "the import walk found too little to be trusted"
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_imports_in_any_order() -> None:
    names = sorted(_modules())
    for order in (names, names[::-1]):
        code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
        done = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]


def test_modules_stay_readable_in_size() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _modules().values()}
    assert {name: n for name, n in sizes.items() if n > 600} == {}


def test_git_tracks_every_file_under_the_package() -> None:
    """A broad .gitignore entry (`deploy/`) once hid new files under sqltune/deploy/ from commits."""
    probes = [f"sqltune/{d}/new_module.py" for d in ("deploy", "serve", "artifacts", "data", "evaluate", "finetune", "models",
                                                             "export", "engines")]
    done = subprocess.run(["git", "check-ignore", "--no-index", *probes], capture_output=True, text=True, cwd=ROOT)
    if done.returncode == 128:  # not a git checkout (an sdist): nothing to check
        return
    assert done.stdout.strip() == "", f"ignored by .gitignore: {done.stdout}"


def test_engines_sit_below_every_stage_that_generates() -> None:
    """One generation loop per backend: `sqltune.engines` is driven by serve, evaluate, ask and the job, and
    never reaches back up into any of them (nor into the export or model-source stages)."""
    modules = _modules()
    graph = {m: _imports(m, p, set(modules)) for m, p in modules.items()}
    above = ("sqltune.serve", "sqltune.evaluate", "sqltune.ask", "sqltune.finetune", "sqltune.export")
    upward = {m: sorted(d for d in deps if d.startswith(above))
              for m, deps in graph.items() if m.startswith("sqltune.engines")}
    assert {m: d for m, d in upward.items() if d} == {}
    assert any(d.startswith("sqltune.engines") for d in graph["sqltune.serve.app"])


def test_every_batch_caller_generates_through_the_engines() -> None:
    """Eval, ask and the job's held-out check drive `sqltune.engines` (through engines.batch), and no
    module outside the engines runs a generation loop of its own (transformers' `.generate(`)."""
    modules = _modules()
    graph = {m: _imports(m, p, set(modules)) for m, p in modules.items()}
    for caller in ("sqltune.evaluate.sources", "sqltune.ask.answer", "sqltune.finetune.heldout"):
        assert "sqltune.engines.batch" in graph[caller], caller
    loops = [m for m, p in modules.items() if not m.startswith("sqltune.engines") and ".generate(" in p.read_text()
             and "model.generate(" in p.read_text()]
    assert loops == []
