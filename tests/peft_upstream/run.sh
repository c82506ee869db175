#!/usr/bin/env bash
# PEFT's own MiSS tests, run twice on the installed PEFT: as released (the baseline) and with
# every MiSS layer on miss_ext's kernels (miss_patch_plugin.py). Passes when the patched run
# passes every test the baseline passes and the patched layers did run (compare_junit.py).
#
# PEFT's wheel has no tests: the script fetches the sdist of the installed version from the
# package index (cached in ~/.cache/miss_ext/) and installs what its test helpers import
# (diffusers, datasets, scipy, attrs). It runs the MiSS tests of tests/test_custom_models.py
# (PEFT's MiSS suite on models built in code) and tests/test_initialization.py; PEFT's other
# MiSS tests load models from the Hugging Face Hub, which this project's machines cannot reach
# (the one such test these files select fails in both runs and is listed, not counted).
#
# Use: bash tests/peft_upstream/run.sh   (in the environment miss_ext and PEFT are installed in)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python}"
ver="$("$py" -c 'import peft; print(peft.__version__)')"
cache="${MISS_EXT_CACHE:-$HOME/.cache/miss_ext}/peft-src-$ver"
say() { printf '[peft_upstream] %s\n' "$*"; }

if [ ! -f "$cache/tests/test_custom_models.py" ]; then
  say "fetching PEFT $ver's sdist (its tests) into $cache"
  tmp="$(mktemp -d)"
  "$py" -m pip download -q --no-deps --no-binary :all: "peft==$ver" -d "$tmp"
  mkdir -p "$cache"
  tar xzf "$tmp"/peft-"$ver".tar.gz -C "$cache" --strip-components=1
  rm -rf "$tmp"
fi
# PEFT's tests import their helpers as a package (from .testing_common import ...).
touch "$cache/tests/__init__.py"
"$py" -m pip install -q diffusers datasets pyyaml scipy attrs

run() {  # $1: 0 = baseline, 1 = patched; $2: junit file
  (cd "$cache" && MISS_EXT_UPSTREAM_PATCH="$1" MISS_EXT_UPSTREAM_COUNT="$out/count" PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 \
    "$py" -m pytest -q -o addopts="" -p no:cacheprovider -p miss_patch_plugin -W ignore \
    tests/test_custom_models.py tests/test_initialization.py -k "MiSS or Miss or miss" --junitxml="$2" \
    | tail -3)
}
out="$(mktemp -d)"
say "PEFT $ver, its MiSS tests: baseline (unpatched)"
run 0 "$out/base.xml" || true
say "the same with miss_ext.peft.patch()"
# pytest's own status counts the tests that fail in both runs; the comparison decides.
run 1 "$out/patched.xml" || true
status=0
"$py" "$here/compare_junit.py" "$out/base.xml" "$out/patched.xml" "$out/count" || status=1
rm -rf "$out"
[ "$status" -eq 0 ] && say "OK" || say "FAILED"
exit "$status"
