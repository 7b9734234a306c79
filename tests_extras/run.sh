#!/usr/bin/env bash
# The extras lane: the report's real pipeline (EnCodec, the 4M DiVAE tokenizers, PANNs, CLIP, Silero VAD,
# Depth-Anything-V2, DSINE's hub entry) built from its real code with random weights, in one environment of
# requirements.txt + requirements-extra.txt. Nothing is downloaded but packages:
#     bash tests_extras/run.sh            (venv in .venv-extra; NANO4M_EXTRAS_VENV=path to put it elsewhere)
# fourm comes from the vendored snapshot of apple/ml-4m at the pinned commit when it is there (no GitHub here),
# else from the git line of requirements-extra.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NANO4M_EXTRAS_VENV:-.venv-extra}
export NANO4M_ML4M_TARBALL=${NANO4M_ML4M_TARBALL:-$(pwd)/../shared/vendor/ml-4m-cda590faa3b9.tar.gz}
python3 -m venv "$VENV"
if [ -f "$NANO4M_ML4M_TARBALL" ]; then
  grep -v '^fourm @' requirements-extra.txt > "$VENV/requirements-extra-offline.txt"
  "$VENV/bin/pip" install -q -r requirements.txt -r requirements-test.txt \
    -r "$VENV/requirements-extra-offline.txt" "$NANO4M_ML4M_TARBALL"
else
  "$VENV/bin/pip" install -q -r requirements.txt -r requirements-test.txt -r requirements-extra.txt
fi
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} "$VENV/bin/python" -m pytest -q tests_extras
