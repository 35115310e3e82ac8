"""Data flows down: the import graph enforces the layers of docs/DESIGN.md.

Two checks. Own edges: which semcache subpackage may import which, directly (the seams) and
transitively over semcache's own modules (the floors). Third-party imports: each module's own
import statements, wherever they stand (a function-level import counts). And one check at run time:
importing any module outside `engine/` leaves `mlx.core` unloaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "semcache"

# Floors, top down. A subpackage may reach (directly or through others) only the floors below it.
FLOORS = ["__main__", "__init__", "http", "service", "scheduler", "engine", "cache", "text", "ops"]
# The seams: what each may import directly. HTTP sees the layers below only through the service.
DIRECT = {
    "__main__": {"http", "service", "ops"},
    # The package's face loads OpenBLAS (engine/blas.py, no MLX) before anything imports mlx.
    "__init__": {"engine"},
    "http": {"service", "text", "ops"},
    "service": {"scheduler", "engine", "cache", "text", "ops"},
    "scheduler": {"engine", "cache", "text", "ops"},
    "engine": {"cache", "text", "ops"},
    "cache": {"ops"},
    "text": {"ops"},
    "ops": set(),
}
# Reachable (transitively): the direct rights closed over, never upwards, never engine from cache.
NEVER = {"cache": {"engine", "scheduler", "service", "http"}, "text": {"engine", "scheduler", "cache"}}

# Third-party packages only some subpackages may import, each exception with its reason.
ONLY_IN = {
    "mlx": {"engine"},
    "mlx_lm": {"engine"},
    "aiohttp": {"http"},
}
EXCEPTIONS = {
    # `semcache agents|health|models` talk to a running daemon over HTTP: an aiohttp client, no server.
    ("ops/cli.py", "aiohttp"),
    # `semcache serve` runs the aiohttp server (web.AppRunner) from __main__.
    ("__main__.py", "aiohttp"),
}
NO_ASYNCIO = {"cache/kvdata.py", "cache/entryfile.py", "cache/cachedir.py", "cache/entrymeta.py", "cache/layout.py", "cache/trie.py", "text/chat.py", "text/tools.py",
              "text/grammar.py", "text/toolrequest.py", "text/holdback.py", "text/reasoning.py", "ops/errors.py", "ops/ratelimit.py", "ops/tenants.py",
              "engine/batch.py", "engine/forward.py", "engine/sampling.py", "engine/models.py", "engine/blas.py", "engine/types.py"}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.stat().st_size)


def floor_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


@cache
def imports_of(path: Path) -> tuple[set[str], set[Path]]:
    """(third-party top-level packages, semcache module files) imported anywhere in `path`."""
    third, own = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "semcache":
                third.add(parts[0])
                continue
            for n in range(len(parts), 1, -1):  # the longest prefix that is a module file
                file = PACKAGE.joinpath(*parts[1:n]).with_suffix(".py")
                if file.exists():
                    own.add(file)
                    break
    return third, own


def reachable(path: Path, planted: frozenset[tuple[Path, Path]] = frozenset()) -> set[Path]:
    """Every semcache module `path` imports through any chain (with `planted` extra edges)."""
    seen, todo = set(), [path]
    while todo:
        here = todo.pop()
        for nxt in imports_of(here)[1] | {b for a, b in planted if a == here}:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def own_edge_problems(path: Path, planted: frozenset[tuple[Path, Path]] = frozenset()) -> list[str]:
    floor = floor_of(path)
    problems = []
    for dep in imports_of(path)[1] | {b for a, b in planted if a == path}:
        other = floor_of(dep)
        if other != floor and other not in DIRECT[floor]:
            problems.append(f"{path.relative_to(PACKAGE)} imports {dep.relative_to(PACKAGE)} ({floor} -> {other})")
    for dep in reachable(path, planted):
        other = floor_of(dep)
        if other == floor:
            continue
        if FLOORS.index(other) < FLOORS.index(floor) or other in NEVER.get(floor, ()):
            problems.append(f"{path.relative_to(PACKAGE)} reaches {dep.relative_to(PACKAGE)} ({floor} -> {other})")
    return problems


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_own_imports_follow_the_floors(path):
    """A module imports only the subpackages its floor may see directly, and reaches nothing above
    its floor (nor, from cache/ and text/, the engine or the scheduler) through any chain."""
    assert floor_of(path) in DIRECT, f"{path} is in no floor: add it to FLOORS and DIRECT"
    assert not own_edge_problems(path)


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_third_party_imports_stay_in_their_subpackage(path):
    """Only engine/ imports mlx and mlx_lm, only http/ aiohttp (listed exceptions aside), and the
    pure modules never import asyncio."""
    rel = str(path.relative_to(PACKAGE))
    third = imports_of(path)[0]
    for package, allowed in ONLY_IN.items():
        if package in third and floor_of(path) not in allowed:
            assert (rel, package) in EXCEPTIONS, f"semcache/{rel} imports {package}"
    if rel in NO_ASYNCIO:
        assert "asyncio" not in third, f"semcache/{rel} imports asyncio"


def test_the_checks_catch_a_planted_edge():
    """An edge planted from the scheduler's sequence module to the HTTP app fails the direct check
    there, and the transitive check in every module that reaches the sequence module (the cache
    index does not; the service does, through the scheduler)."""
    sequence, app = PACKAGE / "scheduler" / "sequence.py", PACKAGE / "http" / "app.py"
    planted = frozenset({(sequence, app)})
    assert "scheduler/sequence.py imports http/app.py (scheduler -> http)" in own_edge_problems(sequence, planted)
    service = PACKAGE / "service" / "service.py"
    assert any(p.startswith("service/service.py reaches http/") for p in own_edge_problems(service, planted))
    assert not own_edge_problems(sequence) and not own_edge_problems(service)


def test_nothing_outside_the_engine_loads_mlx():
    """Importing every module outside engine/ (in a fresh interpreter) leaves mlx.core unloaded."""
    names = [".".join(("semcache", *p.relative_to(PACKAGE).with_suffix("").parts)) for p in modules()
             if floor_of(p) != "engine" and p.name != "__main__.py"]
    code = f"import importlib, sys\nfor n in {names!r}: importlib.import_module(n)\n" \
           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"loaded: {out.stdout.strip()}"


def test_every_semcache_name_the_benchmarks_import_exists():
    """perf/ imports semcache names inside functions too (loaded only when a benchmark runs): each
    one must exist, or a benchmark fails minutes into its run (a moved `read_entry` once did)."""
    import importlib

    missing = []
    for path in sorted((ROOT / "perf").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("semcache"):
                module = importlib.import_module(node.module)
                missing += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and not _is_submodule(node.module, a.name)]
    assert not missing


def _is_submodule(package: str, name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(f"{package}.{name}") is not None
