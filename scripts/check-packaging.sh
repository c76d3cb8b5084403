#!/usr/bin/env bash
# Renders the kustomize tree and lints the Helm chart, so packaging cannot rot unnoticed.
set -euo pipefail
cd "$(dirname "$0")/.."

for dir in config/default config/samples; do
  kubectl kustomize "$dir" >/dev/null
  echo "kustomize $dir: ok"
done

python=""
for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3 python3.12; do
  if command -v "$candidate" >/dev/null 2>&1; then python=$candidate; break; fi
done
if [ -z "$python" ]; then
  echo "check-packaging: Python 3.12 is required for helm-sdkpy" >&2
  exit 1
fi
"$python" -c "import helm_sdkpy" 2>/dev/null || "$python" -m pip install -q helm-sdkpy
"$python" scripts/check-packaging.py charts/ignis
