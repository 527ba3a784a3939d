#!/usr/bin/env bash
# The Helm chart test (README "Deploy"): lints and renders charts/tessera with Helm's engine from
# the PyPI package helm-python-sdk (no helm binary, no cluster), validates every object against
# the Kubernetes schemas with kubernetes-validate --strict, and asserts on the rendered objects.
# Needs only Python 3 with venv and a package index; closes with "chart: N checks passed".
set -euo pipefail
cd "$(dirname "$0")/.."

home=${TESSERA_HOME:-$HOME/.cache/tessera}
venv=${TESSERA_CHART_VENV:-$home/venv-chart}
req=tests/chart/requirements.txt
# Reinstall when the pins change: the stamp holds a copy of the requirements last installed.
if ! cmp -s "$req" "$venv/.requirements" 2>/dev/null || ! "$venv/bin/python" -c "import helm_python, kubernetes_validate, yaml" >/dev/null 2>&1; then
  echo "preparing $venv ($req)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
  cp "$req" "$venv/.requirements"
fi
exec "$venv/bin/python" tests/chart/test_chart.py "$@"
