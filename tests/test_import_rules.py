"""The import rules of docs/architecture.md, checked on the source: where torch may be imported, and which
package may import which."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edge_peft"
TORCH_SIDE = {"torch", "transformers", "optimum", "peft", "onnxscript"}
# package -> packages it must not import, at module level or inside functions
FORBIDDEN = {
    "artifact": {"adapters", "device", "exporter", "store", "cli"},
    "variants": {"adapters", "backends", "device", "store", "cli"},
    "adapters": {"backends", "device", "exporter", "store", "cli"},
    "backends": {"exporter", "store", "cli"},
    "device": {"exporter", "store", "cli"},
    "store": {"backends", "device", "exporter", "federated", "cli"},
    "exporter": {"store", "federated", "cli"},
    "federated": {"exporter", "cli"},
}


SHARED_LEAVES = {"edge_peft.backends.names"}  # the backend vocabulary: a leaf module any package may import


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import in ``path``, outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    parts = module.split(".")[:-1]  # the package the module is in (for __init__: the package itself)
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = parts[: len(parts) - child.level + 1] if child.level else []
                found.append((".".join(base + ([child.module] if child.module else [])), top))
            inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, top and not inner)

    visit(tree, True)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_what_the_layering_allows(package):
    bad = []
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for target, _ in _imports(path):
            head = target.split(".")
            if target in SHARED_LEAVES:
                continue
            if head[0] == "edge_peft" and len(head) > 1 and head[1] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not bad, bad


@pytest.mark.parametrize("package", ["artifact", "variants", "adapters", "backends", "device", "store", "federated"])
def test_only_the_exporter_imports_torch_at_module_level(package):
    bad = [f"{path.relative_to(PACKAGE)} imports {target}" for path in sorted((PACKAGE / package).rglob("*.py"))
           for target, top in _imports(path) if top and target.split(".")[0] in TORCH_SIDE]
    assert not bad, bad


@pytest.mark.slow  # about 1.5 s: a fresh interpreter imports every device-side module
def test_device_side_packages_import_with_torch_unavailable():
    code = ("import sys, pkgutil, importlib\n"
            "for name in ('torch', 'transformers', 'optimum', 'peft', 'onnx'):\n"
            "    sys.modules[name] = None\n"
            "import edge_peft\n"
            "for package in ('artifact', 'variants', 'adapters', 'backends', 'device', 'store', 'federated'):\n"
            "    root = importlib.import_module('edge_peft.' + package)\n"
            "    for info in pkgutil.walk_packages(root.__path__, root.__name__ + '.'):\n"
            "        importlib.import_module(info.name)\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
