#!/usr/bin/env bash
# Download every wheel the image needs into a local folder ("wheelhouse") using the host's pip configuration.
#
#   docker/prepare_wheelhouse.sh [DIR]      (default DIR: /var/cache/lesionlab/wheelhouse)
#
# For builds where the container cannot use the host's package index directly (an egress proxy with its own CA,
# an air-gapped site, a file:// mirror): serve DIR over HTTP on the host and build with
#   --network host --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=http://127.0.0.1:PORT/
# The host's pip must be able to find torch==<lock version>+${TORCH_VARIANT:-cpu} (here: /opt/wheels find-links).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
DIR="${1:-/var/cache/lesionlab/wheelhouse}"
TORCH_VARIANT="${TORCH_VARIANT:-cpu}"
PIP="${PIP:-python3 -m pip}"

mkdir -p "$DIR"
runtime_lock="$(mktemp)"
trap 'rm -f "$runtime_lock"' EXIT
"$here/runtime_lock.sh" "$root/requirements.lock" "$here/dev-only.txt" > "$runtime_lock"
torch_version="$(sed -n 's/^torch==\([^+]*\).*/\1/p' "$root/requirements.lock")"
[ -n "$torch_version" ] || { echo "no 'torch==' line in $root/requirements.lock; expected a pinned torch" >&2; exit 1; }
echo "torch==${torch_version}+${TORCH_VARIANT}" >> "$runtime_lock"
grep -v -e '^#' -e '^[[:space:]]*$' "$here/venv-pins.txt" >> "$runtime_lock"

echo "[prepare_wheelhouse] downloading $(wc -l < "$runtime_lock") pinned wheels into $DIR" >&2
# --no-deps: requirements.lock is a complete `pip freeze`; the image's `pip check` proves nothing is missing.
$PIP download --quiet --only-binary=:all: --no-deps --python-version 3.11 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform linux_x86_64 \
    --implementation cp --dest "$DIR" -r "$runtime_lock"
echo "[prepare_wheelhouse] $(find "$DIR" -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1)" >&2
