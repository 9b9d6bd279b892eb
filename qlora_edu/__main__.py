"""``python -m qlora_edu <command>``: the course's command line.

    python -m qlora_edu doctor      the pre-flight check (versions, GPU, memory, disk, model, chapters)

Test batteries have their own entry point: ``python -m qlora_edu.checks exercises/``.
"""

from __future__ import annotations

import sys

COMMANDS = {"doctor": "the pre-flight check: is this machine ready for the course?"}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its command; print the list of commands when it names none."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m qlora_edu COMMAND [options]\n\ncommands:")
        for name, what in COMMANDS.items():
            print(f"  {name:8s} {what}")
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    from qlora_edu.common.doctor import run_doctor

    return run_doctor(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
