"""Imports go one way: every module imports only from layers below its own (see ARCHITECTURE.md).

Function-local imports count too: they are read from the source, not from what happens to be loaded.
A new upward import fails here with the edge that broke the order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fewstep

ROOT = Path(fewstep.__file__).parent

#: the layers of the package, bottom first; a module may import from lower ranks only (same rank: no)
LAYERS = [
    ["errors"],
    ["seeds", "io", "conditions", "cost", "distributed", "progress", "recompute"],
    ["training", "schedules"],
    ["grids", "conversions", "guidance", "fingerprint"],
    ["denoiser"],
    ["solvers"],
    ["sampling"],
    ["integrations"],
    ["zoo"],
    ["metrics"],
    ["report"],
    ["fit", "evaluate"],  # fitting never imports the evaluation module, nor the other way round
    ["show"],
    ["plots"],
    ["bench", "specs", "showcase"],
    ["cli"],
    ["__main__"],
]
#: inside a package, the same rule over its modules
INNER = {
    "solvers": [
        ["kernel"],
        ["classic", "heun", "artifact_check", "model_match"],
        ["registry", "learned"],
        ["artifact"],
        ["resolve"],
        ["__init__"],
    ],
    "fit": [
        ["config", "teacher_spec", "teacher_cache"],
        ["teacher"],
        ["objectives"],
        ["registry"],
        ["budget"],
        ["loop"],
        ["checkpoint"],
        ["methods"],
        ["api"],
        ["__init__"],
    ],
    "cli": [["common"], ["fitting", "measure", "sampling"], ["__init__"]],
}


def _rank(layers: list[list[str]]) -> dict[str, int]:
    return {name: i for i, names in enumerate(layers) for name in names}


def _imports(path: Path, package: str) -> list[str]:
    """Absolute names (fewstep.x.y) of every fewstep import in a file, nested ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                out += [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            elif node.module and node.module.split(".")[0] == "fewstep":
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "fewstep"]
    return out


def _edges() -> list[tuple[str, str]]:
    edges = []
    for f in ROOT.rglob("*.py"):
        parts = ("fewstep",) + f.relative_to(ROOT).with_suffix("").parts
        package = ".".join(parts[:-1]) if parts[-1] != "__init__" else ".".join(parts[:-1])
        module = ".".join(parts)
        edges += [(module, t) for t in _imports(f, package)]
    return edges


def _component(name: str, depth: int) -> str | None:
    parts = name.split(".")
    return parts[depth] if len(parts) > depth else "__init__"


def test_every_module_is_in_a_layer():
    top = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    ranked = set(_rank(LAYERS)) | {"__init__"}
    assert top <= ranked, f"modules without a layer in tests/test_architecture.py: {sorted(top - ranked)}"
    for pkg, layers in INNER.items():
        mods = {p.stem for p in (ROOT / pkg).glob("*.py")}
        assert mods <= set(_rank(layers)), f"{pkg}: modules without a layer: {sorted(mods - set(_rank(layers)))}"


def test_imports_point_down():
    rank = _rank(LAYERS)
    bad = []
    for src, dst in _edges():
        a, b = _component(src, 1), _component(dst, 1)
        if a == "__init__" or a == b:
            continue
        if rank[b] >= rank[a]:
            bad.append(f"{src} imports {dst}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(set(bad)))


def test_imports_inside_packages_point_down():
    bad = []
    for pkg, layers in INNER.items():
        rank = _rank(layers)
        for src, dst in _edges():
            if _component(src, 1) != pkg or _component(dst, 1) != pkg:
                continue
            a, b = _component(src, 2), _component(dst, 2)
            if a == b or b == "__init__" and a == "__init__":
                continue
            if b not in rank or rank[b] >= rank[a]:
                bad.append(f"{src} imports {dst}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(set(bad)))
