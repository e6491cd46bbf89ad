#!/usr/bin/env bash
# The GPU kit: install its wheels beside the system's PyTorch, unpack the datasets and run
# `python -m experiments gpu-bench`; nothing is downloaded.
#
#   ./run.sh [--tiny] [--skip-wheels] [--work DIR] [gpu-bench flags, e.g. --reproduce-timeout 300]
#
#   --tiny         the gpu-bench tiny CPU mode (seconds; a check that the kit works)
#   --skip-wheels  install nothing: the interpreter already has the kit's packages
#   --work DIR     where the source, the environment, the data, the store and the reports
#                  go (default: work/ beside this script); a second run reuses them
#   PYTHON=...     the interpreter whose torch is used (default: python3)
#
# The result is a new section of DIR/reports/gpu.md.
set -euo pipefail
KIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$KIT/work"
TINY=()
PASS=()
SKIP_WHEELS=0
fail() {
	echo "run.sh: $*" >&2
	exit 2
}
while (($#)); do
	case "$1" in
	--tiny) TINY=(--tiny) ;;
	--skip-wheels) SKIP_WHEELS=1 ;;
	--work)
		(($# > 1)) || fail "--work needs a folder"
		WORK="$2"
		shift
		;;
	-h | --help)
		sed -n '2,14p' "$0" | cut -c3-
		exit 0
		;;
	*) PASS+=("$1") ;;
	esac
	shift
done

command -v "$PYTHON" >/dev/null || fail "$PYTHON: no such interpreter (set PYTHON=/path/to/python)"
missing=$("$PYTHON" -c '
import importlib.util as u
names = ["torch", "torchvision", "numpy", "pandas", "sklearn", "scipy", "matplotlib"]
print(" ".join(n for n in names if u.find_spec(n) is None))') || fail "$PYTHON does not run"
[[ -z "$missing" ]] || fail "$PYTHON cannot import $missing, which the kit takes from the system"
have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
want=$(cat "$KIT/PYTHON_VERSION")
if ((!SKIP_WHEELS)) && [[ "$have" != "$want" ]]; then
	fail "the wheels are for Python $want and $PYTHON is $have: build the kit with --python-version $have"
fi

mkdir -p "$WORK" || fail "$WORK: cannot create the work folder"
WORK="$(cd "$WORK" && pwd)"
SRC="$WORK/src"
VENV="$SRC/.venv"
if [[ ! -f "$SRC/pyproject.toml" ]]; then
	mkdir -p "$SRC"
	tar -xzf "$KIT/source.tar.gz" -C "$SRC" || fail "$KIT/source.tar.gz: cannot extract the source"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
	"$PYTHON" -m venv --system-site-packages --without-pip "$VENV" ||
		fail "$VENV: $PYTHON -m venv failed"
fi
# after the environment's own packages: the source, then every site folder of $PYTHON (a venv
# or conda environment holding torch included)
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
"$PYTHON" -c '
import site, sys
print("\n".join([sys.argv[1], *site.getsitepackages(), site.getusersitepackages()]))' "$SRC" \
	>"$SITE/glyph_kit.pth"

if ((!SKIP_WHEELS)) && [[ ! -f "$VENV/.kit-wheels" ]]; then
	"$VENV/bin/python" -m pip --version >/dev/null 2>&1 || fail "$PYTHON has no pip to install the wheels"
	"$VENV/bin/python" -m pip install --quiet --no-index --no-deps --ignore-installed \
		--disable-pip-version-check --no-warn-script-location "$KIT"/wheels/*.whl ||
		fail "$KIT/wheels: pip could not install the wheels into $VENV (its message is above)"
	touch "$VENV/.kit-wheels"
fi
"$VENV/bin/python" -c 'import mlflow, optuna, kornia, sqlalchemy, filelock, tabulate, tqdm' ||
	fail "$VENV: the kit's packages do not import (the error is above)"
touch "$VENV/.installed" # the Makefile's install stamp: make uses this environment as it is

DATA="$WORK/data"
if [[ ! -d "$DATA" ]]; then
	rm -rf "$DATA.partial"
	(cd "$SRC" && "$VENV/bin/python" -m data_tools.pack unpack "$KIT/data" "$DATA.partial") || exit 2
	mv "$DATA.partial" "$DATA"
fi

export DATA_DIR="$DATA" CACHE_DIR="$WORK/cache" MLRUNS_DIR="$WORK/mlruns" REPORTS_DIR="$WORK/reports"
cd "$SRC"
"$VENV/bin/python" -m experiments gpu-bench ${TINY[@]+"${TINY[@]}"} ${PASS[@]+"${PASS[@]}"}
echo "results: $REPORTS_DIR/gpu.md"
