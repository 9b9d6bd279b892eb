"""The course's reference facts: measured figures the lessons and tests are checked against.

The files live in ``qlora_edu/reference/`` and ship with the package, so a clone of the repository can audit
its own expected values:

* ``gpu-facts.md``: QLoRA memory, speed and paging measured on an H100 (by ``gpu_probe.py``, beside it);
* ``gpu-runs.md``: the course's own code run on an H200;
* ``environment-facts.md``: the machines the course is built, tested and taught on;
* ``bitsandbytes-0.50.2-facts.md``: what bitsandbytes 0.50.2 does, which the course must match.

Each file is a copy of the project's shared reference notes with a short provenance header on top (where it
came from, when it was copied, what the figures were measured on). The header ends with a line that contains
:data:`HEADER_END`; everything after that line is the source, byte for byte, which is what
:func:`reference_body` returns. Torch-free: :mod:`qlora_edu.common.doctor` and the tests can read it anywhere.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["REFERENCE_DIR", "reference_names", "reference_path", "reference_body"]

#: The folder of the reference files (package data).
REFERENCE_DIR = Path(__file__).resolve().parent.parent / "reference"

#: The text of the provenance header's last line (``end of provenance header -->`` in Markdown,
#: ``# end of provenance header`` in Python).
HEADER_END = "end of provenance header"


def reference_names() -> tuple[str, ...]:
    """The file names in :data:`REFERENCE_DIR`, sorted (``("bitsandbytes-0.50.2-facts.md", ...)``)."""
    return tuple(sorted(p.name for p in REFERENCE_DIR.iterdir() if p.is_file() and p.suffix in (".md", ".py")))


def reference_path(name: str) -> Path:
    """The path of the reference file ``name`` (``"gpu-facts.md"``, say).

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: there is no such file; the message names ``name`` and lists the files there are.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a file name such as 'gpu-facts.md' (a str), got {type(name).__name__}")
    path = REFERENCE_DIR / name
    if Path(name).name != name or not path.is_file():
        raise ValueError(f"name={name!r} is not a reference file; the reference files are {list(reference_names())} "
                         f"(in {REFERENCE_DIR})")
    return path


def reference_body(name: str) -> str:
    """The text of the reference file ``name`` without its provenance header: the source, as it was copied.

    Readers that parse a file (the memory chapter reads the training rows of ``gpu-facts.md``) should parse
    this, so the header can never be mistaken for content.

    Raises:
        TypeError, ValueError: as :func:`reference_path`; ValueError also when the file has lost its header.
    """
    text = reference_path(name).read_text(encoding="utf-8")
    head, sep, body = text.partition(HEADER_END)
    if not sep or head.count("\n") > 20:
        raise ValueError(f"name={name!r}: {reference_path(name)} has no provenance header ending in "
                         f"{HEADER_END!r} within its first 20 lines")
    return body.split("\n", 1)[1]
