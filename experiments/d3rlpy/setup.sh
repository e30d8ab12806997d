#!/usr/bin/env bash
# d3rlpy's own virtual environment (it pins gymnasium 1.0.0; offrl's runs on a newer one), beside offrl's.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${D3RLPY_VENV:-.venv-d3rlpy}
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$VENV/bin/python" -m pip install -q "d3rlpy==2.8.1"
"$VENV/bin/python" -c "import d3rlpy; print('d3rlpy', d3rlpy.__version__, 'in $VENV')"
