"""The package's import graph: no cycles, and imports run down the course (common -> chapter 1 -> ... -> 11).

Every ``import`` / ``from ... import`` of a ``qlora_edu`` module anywhere in a file counts, a function-level (lazy)
one included: a lazy import is still a dependency, only a later one. Layers: ``qlora_edu.common`` and the battery
framework ``qlora_edu.checks`` are layer 0, chapter ``NN`` is layer ``NN + 1``, the package root (which only finds
names lazily) is left out. An import from a lower layer to a higher one is *upward*. Each one the course allows is
named in ``ALLOWED_UPWARD`` with why: the one model set-up builds chapter 7's layer, and two later chapters serve an
earlier one's function (the Triton kernel of chapter 10 is chapter 3's CUDA path; chapter 11's per-GPU shard formula
is what chapter 4's ``training_memory(world_size=N)`` computes, so the learner's function is the package's). Each is
a function-level import inside the one function that needs it.

Run as a script it prints the figures: ``python tests/test_layers.py``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qlora_edu"

#: (importer, imported) module pairs that may point upward, with why.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    ("qlora_edu.common.training_setup", "qlora_edu.ch07_qlora.qlora"):
        "setup_training('qlora_scratch') builds the course's own QLoRA layer (apply_qlora)",
    ("qlora_edu.ch03_double_quant.nf4_codec", "qlora_edu.ch10_triton.nf4_triton"):
        "dequantize_nf4 on CUDA runs chapter 10's fused kernel",
    ("qlora_edu.ch04_memory.memory", "qlora_edu.ch11_fsdp.sharding"):
        "training_memory(world_size=N) divides the static parts with chapter 11's per_gpu_static",
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: Path = PACKAGE) -> set[str]:
    """The ``qlora_edu`` modules ``path`` imports (``from qlora_edu.x import y`` counts ``qlora_edu.x.y`` when that
    is a module, else ``qlora_edu.x``)."""
    modules = {module_name(p, package) for p in package_files(package)}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("qlora_edu")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlora_edu") \
                and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules and m != module_name(path, package)}


def package_files(package: Path = PACKAGE) -> list[Path]:
    """The package's modules: ``.py`` files in folders that are packages (``reference/`` holds data, not code)."""
    return sorted(p for p in package.rglob("*.py") if (p.parent / "__init__.py").is_file())


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    return {module_name(p, package): imports_of(p, package) for p in package_files(package)}


def layer(module: str) -> int | None:
    """0 for common and checks, NN + 1 for chapter NN, None for the package root."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    if parts[1] in ("common", "checks", "__main__"):
        return 0
    if parts[1].startswith("ch") and parts[1][2:4].isdigit():
        return int(parts[1][2:4]) + 1
    raise ValueError(f"module {module} is in no layer")


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def upward(g: dict[str, set[str]], layer_of=layer) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in g.items() for b in targets
                  if layer_of(a) is not None and layer_of(b) is not None and layer_of(b) > layer_of(a))


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_upward_imports_are_the_named_few():
    found = upward(graph())
    assert len(found) <= len(ALLOWED_UPWARD) == 3, found
    assert set(found) <= set(ALLOWED_UPWARD), f"not in ALLOWED_UPWARD: {set(found) - set(ALLOWED_UPWARD)}"


def test_guard_primitives_need_no_torch():
    """``qlora_edu.common.guards`` imports without torch (the doctor uses it to report a missing torch)."""
    import subprocess

    code = ("import sys; sys.modules['torch'] = None\n"
            "import qlora_edu.common.guards as g\n"
            "g.check_int('n', 3); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "ok", out.stderr


if __name__ == "__main__":
    g = graph()
    print(f"{len(g)} modules, {sum(map(len, g.values()))} import edges, "
          f"{len({layer(m) for m in g} - {None})} layers")
    print("cycles:", cycles(g))
    print("upward:", upward(g))
