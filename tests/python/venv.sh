#!/usr/bin/env bash
# Makes, once, a venv for the Python tests under target/pyvenv/ from the
# given interpreter (default: python3), with requirements.txt installed from
# PyPI (httpx for agent.py, py-spy as the tests' oracle), and prints the
# venv's python on stdout. Run again, it only prints the path, unless
# requirements.txt changed. Progress goes to stderr.
#
#   py=$(tests/python/venv.sh ~/.pyenv/versions/3.12.1/bin/python3)
#   "$py" tests/python/agent.py
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
py=${1:-python3}
# The interpreter itself, not a pyenv shim or a symlink.
real=$("$py" -c 'import os, sys; print(os.path.realpath(sys.executable))')
ver=$("$real" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')
name="$ver-$(printf '%s' "$real" | sha256sum | cut -c1-8)"
dir="${CARGO_TARGET_DIR:-$root/target}/pyvenv/$name"
if ! cmp -s "$here/requirements.txt" "$dir/.requirements" 2>/dev/null; then
  echo "venv.sh: making $dir from $real" >&2
  rm -rf "$dir"
  "$real" -m venv "$dir" >&2
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$here/requirements.txt" >&2
  cp "$here/requirements.txt" "$dir/.requirements"
fi
echo "$dir/bin/python"
