"""The one-way imports of the house (STYLE.md), checked from the source on every CI run.

config -> model (+ kernels) -> checkpoint -> inference -> server / cli; training and distributed wrap the
model from outside. Imports inside functions count too; the one allowed upward call is model/ reaching
dsv3.checkpoint inside a function (`from_pretrained` / `save_pretrained`), and checkpoint/ never imports
model/, so even that is no cycle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "dsv3"

LOW = ["dsv3.model", "dsv3.checkpoint", "dsv3.inference", "dsv3.server", "dsv3.training", "dsv3.distributed"]
RULES = {  # folder or file under src/dsv3 -> import prefixes it must not use
    "model": ["torch.distributed", "dsv3.training", "dsv3.distributed", "dsv3.server", "dsv3.cli",
              "dsv3.inference", "dsv3.bench"],
    "kernels": [*LOW, "dsv3.cli", "dsv3.config"],
    "config.py": [*LOW, "dsv3.cli", "dsv3.kernels"],
    "presets.py": [*LOW, "dsv3.cli", "dsv3.kernels", "dsv3.config"],
    "errors.py": [*LOW, "dsv3.cli", "dsv3.kernels", "dsv3.config"],
    "checkpoint": ["dsv3.model", "dsv3.inference", "dsv3.server", "dsv3.training", "dsv3.distributed", "dsv3.cli",
                   "torch.distributed"],
    "inference": ["dsv3.server", "dsv3.cli", "dsv3.training", "dsv3.distributed", "dsv3.bench"],
    "tokenizer.py": ["dsv3.model", "dsv3.inference", "dsv3.server", "dsv3.training", "dsv3.distributed"],
}  # fmt: skip
# model/ may reach checkpoint/ inside a function only (the pinned from_pretrained / save_pretrained API).
FUNCTION_ONLY = {"model": ["dsv3.checkpoint"]}


def imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(absolute module name, at module level?) for every import in `path`, relative ones resolved."""
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found += [(f"{base}.{alias.name}", id(node) in top_level) for alias in node.names]
    return found


def files(where: str) -> list[pathlib.Path]:
    target = SRC / where
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


def _banned(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("where", sorted(RULES))
def test_imports_run_one_way(where):
    breaches = []
    for path in files(where):
        for name, at_top in imports(path):
            if _banned(name, RULES[where]):
                breaches.append(f"{path.relative_to(SRC)} imports {name}")
            if at_top and _banned(name, FUNCTION_ONLY.get(where, [])):
                breaches.append(f"{path.relative_to(SRC)} imports {name} at module level")
    assert not breaches


def test_the_checker_sees_relative_and_function_imports(tmp_path, monkeypatch):
    """The rules above would be vacuous if `imports` missed a form of import: check it on a hand-made module."""
    pkg = tmp_path / "dsv3" / "model"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text(
        "from ..inference import generate\nimport torch.distributed as dist\n"
        "def f():\n    from ..checkpoint.load import load_model\n"
    )
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path / "dsv3")
    assert imports(pkg / "x.py") == [
        ("dsv3.inference.generate", True),
        ("torch.distributed", True),
        ("dsv3.checkpoint.load.load_model", False),
    ]


def _unit(module: str) -> str:
    """The house unit a module belongs to: dsv3.model.moe -> model, dsv3.cli -> cli."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_import_cycle_between_units():
    """Package-level imports form no cycle (cli <-> server, model <-> checkpoint, generate <-> speculative
    each happened once): a unit that needs something from a higher one gets it passed in instead."""
    edges: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        unit = module.split(".")[1] if module.count(".") else "dsv3"
        for name, _ in imports(path):
            if name.startswith("dsv3.") and _unit(name) != unit:
                edges.setdefault(unit, set()).add(_unit(name))
    inference = SRC / "inference"
    for path in sorted(inference.glob("*.py")):  # inside inference/, module by module
        module = path.stem
        for name, _ in imports(path):
            if name.startswith("dsv3.inference."):
                edges.setdefault(f"inference.{module}", set()).add("inference." + name.split(".")[2])

    def cycle_from(start: str, node: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                return (*seen, nxt)
            if nxt not in seen:
                found = cycle_from(start, nxt, (*seen, nxt))
                if found:
                    return found
        return None

    cycles = [c for c in (cycle_from(u, u, (u,)) for u in sorted(edges)) if c]
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)
