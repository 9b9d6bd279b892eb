"""Write chapter 8's data set: ``qlora_edu/ch08_finetune/data/orders_train.jsonl`` (2,000 examples) and
``qlora_edu/ch08_finetune/data/orders_heldout.jsonl`` (200) and ``orders_heldout_templates.jsonl`` (200: sentences,
items and remarks never seen in training), deterministically (:func:`qlora_edu.ch08_finetune.instruct_data.
generate_dataset` and :func:`~qlora_edu.ch08_finetune.instruct_data.generate_heldout_templates`).

    python scripts/make_finetune_data.py            # (re)write the committed files
    python scripts/make_finetune_data.py --check    # exit 1 if the committed files differ from a fresh generation
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from qlora_edu.ch08_finetune.instruct_data import DATA_DIR, write_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DATA_DIR, help=f"output folder (default {DATA_DIR})")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = parser.parse_args(argv)
    if not args.check:
        for split, path in write_dataset(args.out).items():
            print(f"{split}: {path} ({sum(1 for _ in path.open())} examples)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = write_dataset(tmp)
        stale = [p.name for p in fresh.values() if not (args.out / p.name).is_file()
                 or (args.out / p.name).read_bytes() != p.read_bytes()]
    if stale:
        print(f"stale or missing in {args.out}: {', '.join(stale)}; run python scripts/make_finetune_data.py")
        return 1
    print(f"{args.out}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
