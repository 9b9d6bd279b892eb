"""What a learner imports: `import qlora_edu` is light and loads no tooling, every public name resolves, the
environment is read in one module, and every function a learner writes starts with one call to its guard."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGE = ROOT / "qlora_edu"
TOOLING = ("hypothesis", "nbclient", "nbformat", "jupytext", "pytest", "transformers", "peft", "bitsandbytes")


def test_import_loads_no_tooling():
    code = ("import sys, qlora_edu; from qlora_edu import absmax_quantize, quantize_nf4, check; "
            f"print(','.join(m for m in {TOOLING!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing qlora_edu loaded {out.stdout.strip()}"


def test_import_of_the_package_root_loads_nothing_heavy():
    code = "import sys, qlora_edu; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


_LOOKUPS = """
import json, os, socket, sys
lookups = []
real = socket.getaddrinfo
socket.getaddrinfo = lambda host, *a, **k: lookups.append(host) or real(host, *a, **k)
import qlora_edu
import peft  # imports bitsandbytes, as the course's set-ups do
import bitsandbytes
kernels = sys.modules.get("kernels")
print(json.dumps({"lookups": lookups,
                  "wrapped": bool(getattr(getattr(kernels, "get_kernel", None), "qlora_edu_offline", False))}))
"""


@pytest.mark.parametrize("allowed", [False, True])
def test_importing_bitsandbytes_after_the_course_makes_no_network_request(allowed):
    """bitsandbytes 0.50.2 on a CPU with AVX512-BF16 asks huggingface.co for a kernel when imported; after
    ``import qlora_edu`` that lookup is refused without a request (qlora_edu/common/offline.py), unless
    QLORA_EDU_HUB_KERNELS=1. On a CPU without that instruction set bitsandbytes asks nothing either way: the
    wrapper must still be in place, and never a lookup of the Hub while it is."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "QLORA_EDU_HUB_KERNELS"}
    if allowed:
        env["QLORA_EDU_HUB_KERNELS"] = "1"
    out = subprocess.run([sys.executable, "-c", _LOOKUPS], capture_output=True, text=True, cwd=ROOT, timeout=180,
                         env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if allowed:
        assert result["wrapped"] is False
    else:
        assert result["wrapped"] is True and result["lookups"] == [], result


def test_every_public_name_resolves_to_its_module():
    import qlora_edu

    index = qlora_edu._public_names()
    assert len(index) > 30
    for name, module in index.items():
        if module.endswith(("base_model", "perplexity")):
            continue  # importing transformers costs seconds; test_base_model covers these
        assert getattr(qlora_edu, name) is getattr(__import__(module, fromlist=[name]), name)
    with pytest.raises(AttributeError, match="no attribute"):
        qlora_edu.no_such_function  # noqa: B018


def test_the_environment_is_read_in_settings_only():
    readers = [p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
               if any(w in p.read_text() for w in ("os.environ", "getenv(")) and p.name != "settings.py"
               and p.parent.name != "reference"]  # reference/ holds copied measuring scripts, not package code
    assert readers == [], f"read os.environ outside qlora_edu/common/settings.py: {readers}"


def _solution_functions() -> list[tuple[str, ast.FunctionDef]]:
    """Every package function with a `# BEGIN SOLUTION` region: the functions learners write."""
    found = []
    for path in sorted(PACKAGE.glob("ch[0-9][0-9]_*/*.py")):
        source = path.read_text()
        for node in ast.parse(source).body:  # module-level functions (a layer's forward has tensors, not arguments)
            if isinstance(node, ast.FunctionDef) and "# BEGIN SOLUTION" in ast.get_source_segment(source, node) \
                    and not _is_triton_kernel(node):
                found.append((f"{path.parent.name}.{path.stem}", node))
    return found


def _is_triton_kernel(fn: ast.FunctionDef) -> bool:
    """A Triton kernel (an argument annotated ``tl.constexpr``) cannot call a Python guard: compiled, it may call
    only jit functions; its guard is its launcher's first line (``check_launch_<kernel>_args``)."""
    return any(a.annotation is not None and ast.unparse(a.annotation) == "tl.constexpr" for a in fn.args.args)


@pytest.mark.parametrize(("module", "fn"), _solution_functions(), ids=lambda v: getattr(v, "name", v))
def test_a_learner_function_starts_with_one_guard_call(module, fn):
    """Its first statement (after the docstring) is one call to check_<name>_args from qlora_edu.common.guards; no
    other argument check follows it. (Functions without arguments have nothing to guard.)"""
    if not fn.args.args:
        return
    body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant) else fn.body
    first = body[0]
    call = first.value if isinstance(first, (ast.Expr, ast.Assign)) else None
    assert isinstance(call, ast.Call) and getattr(call.func, "id", "") == f"check_{fn.name}_args", \
        f"{module}.{fn.name} must start with check_{fn.name}_args(...)"
    later = [n.func.id for stmt in body[1:] for n in ast.walk(stmt)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id.startswith("check_")
             and n.func.id != "check_finite_absmax"]
    assert later == [], f"{module}.{fn.name} checks arguments again after its guard: {later}"
    package, stem = module.split(".")
    source = (PACKAGE / package / f"{stem}.py").read_text()
    assert f"from qlora_edu.{package}.guards import" in source, f"{module} must take its guards from {package}.guards"
