#!/bin/sh
# Print requirements.lock without the dev-only packages (docker/dev-only.txt) and without torch.
#   docker/runtime_lock.sh requirements.lock docker/dev-only.txt > runtime.lock
# torch is installed separately so that its build (cpu, cu128, ...) can be chosen with TORCH_VARIANT.
set -eu
lock="$1"
exclude="$2"
names="$(grep -v -e '^#' -e '^[[:space:]]*$' "$exclude" | tr '[:upper:]' '[:lower:]' | tr '_' '-') torch"
while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    name="$(printf '%s' "${line%%[=<>!~ ;]*}" | tr '[:upper:]' '[:lower:]' | tr '_' '-')"
    skip=0
    for n in $names; do [ "$n" = "$name" ] && skip=1 && break; done
    [ "$skip" = 1 ] || printf '%s\n' "$line"
done < "$lock"
