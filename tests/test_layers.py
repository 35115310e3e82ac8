"""Data flows down: the import graph enforces the layering of ../shared/DESIGN.md §1."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "semcache"

# module -> top-level packages it must never import
FORBIDDEN = {
    "config": {"aiohttp", "mlx", "mlx_lm"},
    "errors": {"aiohttp", "mlx", "mlx_lm", "asyncio"},
    "sequence": {"aiohttp", "mlx", "mlx_lm"},
    "chat": {"aiohttp", "asyncio", "mlx"},
    "scheduler": {"aiohttp"},
    "waiting": {"aiohttp", "mlx", "mlx_lm"},
    "running": {"aiohttp", "mlx", "mlx_lm"},
    # tool use: formats and parsing are pure (mlx-lm only for its tool_parsers); grammars only touch
    # numpy and llguidance
    "tools": {"aiohttp", "asyncio", "mlx"},
    "grammar": {"aiohttp", "asyncio", "mlx", "mlx_lm"},
    "toolrequest": {"aiohttp", "asyncio", "mlx", "mlx_lm"},
    "serving": {"aiohttp"},
    "engine": {"aiohttp"},
    "batch": {"aiohttp", "asyncio"},
    "sampling": {"aiohttp", "asyncio"},
    "models": {"aiohttp", "asyncio"},
    "blas": {"aiohttp", "asyncio", "mlx"},
    # the agent cache: arrays are numpy, so nothing in it may call MLX off the MLX thread
    "kvcache": {"aiohttp", "mlx", "mlx_lm"},
    "kventry": {"aiohttp", "mlx", "mlx_lm"},
    "kvdisk": {"aiohttp", "mlx", "mlx_lm"},
    "kvdata": {"aiohttp", "asyncio", "mlx", "mlx_lm"},
    "store": {"aiohttp", "asyncio", "mlx", "mlx_lm"},
    "trie": {"aiohttp", "asyncio", "mlx", "mlx_lm"},
    "tenants": {"aiohttp", "asyncio", "mlx", "mlx_lm"},
    "ratelimit": {"aiohttp", "asyncio", "mlx", "mlx_lm"},
    "metrics": {"aiohttp", "mlx", "mlx_lm"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_respects_its_layer(module):
    """Nothing below the HTTP layer imports aiohttp; nothing below the engine imports asyncio."""
    found = imported_packages(PACKAGE / f"{module}.py") & FORBIDDEN[module]
    assert not found, f"semcache/{module}.py imports {sorted(found)}"
