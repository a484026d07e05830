#!/usr/bin/env bash
# make test-wheel: the one wheel in dist/ (make wheel), installed with a plain `pip install` into a
# fresh venv per torch version, each running the op tests and the shipped self-test against it.
# The ops library uses the LibTorch stable ABI, so the same file must load and pass beside every
# torch from 2.10 on. Default versions: 2.13.0 (the CPU build on this machine's disk) and 2.14.1
# (a CUDA build, run on the CPU here; ~5.5 GB per venv). Override: TORCH_VERSIONS="2.13.0". Then a
# plain `pip install .` (build isolation) of a clean copy of HEAD beside torch 2.13.0 (PLAIN_INSTALL=0: skip).
#
#   tools/test_wheel.sh [log file]     (venvs under build/wheel-venvs/, made anew on every run)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3.11}
TORCH_VERSIONS=${TORCH_VERSIONS:-"2.13.0 2.14.1"}
LOG=${1:-/dev/null}
cd "$ROOT"
wheels=(dist/doe_ext-*.whl)
[ -f "${wheels[0]}" ] || { echo "no wheel in dist/: run make wheel first" >&2; exit 1; }
[ ${#wheels[@]} -eq 1 ] || { echo "more than one wheel in dist/: ${wheels[*]}" >&2; exit 1; }
WHEEL=$ROOT/${wheels[0]}
{
  echo "# make test-wheel, $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -m), $(nproc) cores"
  echo "# wheel: $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB); contents:"
  "$PYTHON" -m zipfile -l "$WHEEL" | awk 'NR > 1 && $1 ~ /\.so$/ {print "#   " $1}'
} | tee -a "$LOG"
status=0
# Runs a command from /tmp (nothing in this checkout may shadow the installed package); logs its
# failures and last lines; a non-zero exit fails the whole run.
check() {
  local out rc=0
  out=$(cd /tmp && "$@" 2>&1) || rc=$?
  { printf '%s\n' "$out" | grep -E "^(FAILED|ERROR) " || true; printf '%s\n' "$out" | tail -n 2; } | tee -a "$LOG"
  [ $rc = 0 ] || { echo "exit status $rc: $*" | tee -a "$LOG"; status=1; }
}
for version in $TORCH_VERSIONS; do
  venv=$ROOT/build/wheel-venvs/torch-$version
  echo "## torch $version: venv $venv" | tee -a "$LOG"
  rm -rf "$venv" && "$PYTHON" -m venv "$venv"
  pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install "torch==$version"
  # The wheel as a user installs it (its [test] extra for pytest and the references): plain pip, no flags.
  "${pip[@]}" install "$WHEEL[test]"
  check "$venv/bin/python" -c "import doe_ext, torch; print('build_info:', doe_ext.build_info())"
  check "$venv/bin/python" -m pytest "$ROOT/tests/ops" -q -p no:cacheprovider --rootdir "$ROOT"
  check "$venv/bin/python" -m doe_ext.selftest --dtype float32 --dtype float64 --dtype bfloat16
done
# A plain `pip install .` (build isolation on) into a fresh venv with torch 2.13.0: pip builds against
# its own newest torch in the isolated build environment; the result must load beside 2.13.0.
if [ "${PLAIN_INSTALL:-1}" = 1 ]; then
  venv=$ROOT/build/wheel-venvs/plain-install
  src=$ROOT/build/wheel-venvs/plain-install-src
  echo "## plain pip install of a clean copy of HEAD, into a venv with torch 2.13.0: $venv" | tee -a "$LOG"
  rm -rf "$venv" "$src" && mkdir -p "$src" && git archive HEAD | tar -x -C "$src"
  "$PYTHON" -m venv "$venv"
  pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install torch==2.13.0
  "${pip[@]}" install "$src[test]"
  check "$venv/bin/python" -c "import doe_ext, torch; print('build_info:', doe_ext.build_info())"
  check "$venv/bin/python" -m doe_ext.selftest --dtype float32 --dtype float64 --dtype bfloat16
fi
echo "# test-wheel: $([ $status = 0 ] && echo passed || echo FAILED)" | tee -a "$LOG"
exit $status
