"""No network at import: keep bitsandbytes from asking the Hugging Face Hub for a CPU kernel.

bitsandbytes 0.50.2, imported on a CPU with AVX512-BF16, calls ``kernels.get_kernel(
"kernels-community/quantization-bitsandbytes")`` at import time: a request to huggingface.co (seen on the course's
build machine: two DNS lookups of ``huggingface.co`` per ``import bitsandbytes``, then a warning when they fail).
The course's default path is offline, so :func:`install` (run by ``import qlora_edu``) arranges that, the moment
anything first imports bitsandbytes, that one lookup fails at once without touching the network. bitsandbytes then
does what it does whenever the lookup fails: it keeps its own CPU kernels and logs a warning (the lessons silence
that logger). Nothing else ``kernels`` fetches is affected. ``QLORA_EDU_HUB_KERNELS=1`` lets the lookup through.

It covers imports made after ``import qlora_edu``: a notebook that imports bitsandbytes (or peft, which imports it)
before the course's package goes online as bitsandbytes decides.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys

from qlora_edu.common import settings

__all__ = ["BNB_KERNEL_REPO", "install", "keep_bitsandbytes_offline"]

#: The repository bitsandbytes' CPU backend asks for (``bitsandbytes/backends/cpu/ops.py``).
BNB_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"


def keep_bitsandbytes_offline() -> bool:
    """Wrap ``kernels.get_kernel`` so that :data:`BNB_KERNEL_REPO` raises at once instead of going online.

    Returns True when the wrapper is in place (now or from an earlier call), False when it is not needed or not
    wanted: ``kernels`` is not installed, or ``QLORA_EDU_HUB_KERNELS=1``."""
    if settings.hub_kernels_allowed():
        return False
    try:
        import kernels
    except ImportError:  # no `kernels`: bitsandbytes cannot go online for it either
        return False
    original = kernels.get_kernel
    if getattr(original, "qlora_edu_offline", False):
        return True

    @functools.wraps(original)
    def get_kernel(repo_id, *args, **kwargs):
        if repo_id == BNB_KERNEL_REPO:
            raise RuntimeError(f"{repo_id} not fetched: the course runs offline by default "
                               f"(set {settings.HUB_KERNELS_ENV}=1 to let bitsandbytes download it)")
        return original(repo_id, *args, **kwargs)

    get_kernel.qlora_edu_offline = True
    kernels.get_kernel = get_kernel
    return True


class _BeforeBitsandbytes(importlib.abc.MetaPathFinder):
    """An import hook that finds nothing: it only runs :func:`keep_bitsandbytes_offline` just before the first
    ``import bitsandbytes`` (whoever makes it), then removes itself, so importing the course stays free."""

    def find_spec(self, name, path=None, target=None):
        if name == "bitsandbytes":
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            keep_bitsandbytes_offline()
        return None


def install() -> None:
    """Arrange for :func:`keep_bitsandbytes_offline` to run before bitsandbytes is first imported (at once when it
    already is: it only matters for the first import, and a later call changes nothing)."""
    if "bitsandbytes" in sys.modules:
        return
    if not any(isinstance(f, _BeforeBitsandbytes) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeBitsandbytes())
