#!/usr/bin/env bash
# Installs the real Kubernetes clients the API-server tests drive (the differential test against
# kube-apiserver and the Helm round trip): a private Python venv with the official `kubernetes`
# client, lightkube and kr8s, pinned in tests/differential/requirements.txt. kubectl comes from
# the machine; kube-apiserver, etcd and Helm come from scripts/tools.sh. Safe to run again: a venv
# whose requirements did not change is kept. Prints the venv's python on the last line.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${IGNIS_CACHE:-$HOME/.cache/ignis}"
req="$root/tests/differential/requirements.txt"

die() { echo "setup-clients: $*" >&2; exit 1; }

# Python >= 3.10; 3.12 preferred (what helm-sdkpy would need), taken from pyenv when present.
python=""
for candidate in "$(pyenv root 2>/dev/null)/versions/3.12"*/bin/python3 python3.12 python3.13 python3.11 python3 ; do
  if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    python="$(command -v "$candidate")"
    break
  fi
done
[ -n "$python" ] || die "no Python >= 3.10 with the venv module found (apt-get install python3-venv)"

stamp="$(cat "$req" "$python" 2>/dev/null | sha256sum | cut -c1-16)"
venv="$cache/clients-venv"
if [ ! -f "$venv/.stamp" ] || [ "$(cat "$venv/.stamp")" != "$stamp" ]; then
  echo "setup-clients: creating $venv with $("$python" --version)" >&2
  rm -rf "$venv.tmp"
  "$python" -m venv "$venv.tmp"
  "$venv.tmp/bin/pip" install --quiet --disable-pip-version-check -r "$req" \
    || die "pip could not install $req (PyPI must be reachable)"
  echo "$stamp" >"$venv.tmp/.stamp"
  rm -rf "$venv"
  mv "$venv.tmp" "$venv"
  # A venv records its own path in its scripts; recreate it in place after the move.
  "$python" -m venv --upgrade "$venv" >/dev/null
fi
command -v kubectl >/dev/null || die "kubectl is missing (the image ships it; apt-get install kubectl otherwise)"
echo "$venv/bin/python"
