#!/bin/sh
# Container entry point: `lesionlab <command> ...`; with no arguments the image's CMD (`serve --host 0.0.0.0`) runs.
#
#   docker run IMAGE                                  -> lesionlab serve --host 0.0.0.0 (port 7860)
#   docker run IMAGE predict --images /in --out /runs/preds.csv
#   docker run IMAGE train --config /app/configs/demo.yaml --run-dir /runs/demo
#   docker run IMAGE lesionlab predict ...            -> the same (a program on PATH runs as given)
#   docker run IMAGE bash | python ...                -> runs that program instead (debugging)
#
# For `serve`, these environment variables fill in options that were not given on the command line:
#   LESIONLAB_PORT (default 7860), LESIONLAB_MODELS (folder of bundles), LESIONLAB_CONCURRENCY.
set -eu

if [ "$#" -eq 0 ]; then
    set -- serve --host 0.0.0.0
fi

case "$1" in
    -*|ingest|run|train|evaluate|predict|ensemble|serve|users)
        ;;
    *)
        # Not a lesionlab sub-command: run it as a program if there is one by that name (bash, python, ...).
        if command -v "$1" >/dev/null 2>&1; then
            exec "$@"
        fi
        ;;
esac

if [ "$1" = "serve" ]; then
    has_option() {
        option="$1"
        shift
        for arg in "$@"; do
            case "$arg" in "$option"|"$option"=*) return 0 ;; esac
        done
        return 1
    }
    shift
    has_option --port "$@" || set -- "$@" --port "${LESIONLAB_PORT:-7860}"
    if [ -n "${LESIONLAB_MODELS:-}" ] && ! has_option --models "$@"; then
        set -- "$@" --models "$LESIONLAB_MODELS"
    fi
    if [ -n "${LESIONLAB_CONCURRENCY:-}" ] && ! has_option --concurrency "$@"; then
        set -- "$@" --concurrency "$LESIONLAB_CONCURRENCY"
    fi
    set -- serve "$@"
fi

exec lesionlab "$@"
