#!/usr/bin/env bash
# Build the kvserve image with podman and test it as a deployment would use it:
# the model as a read-only volume, settings as KVSERVE_* variables, the health
# check, a generation streamed with kvctl from the host, and SIGTERM during
# that stream: the stream must complete and the container exit 0. Also checks
# docker/compose.yaml with podman-compose. Prints the image size.
#   docker/test.sh [MODEL] [BUILD_DIR]   (MODEL: a directory or GGUF file; default the test model)
# As root on Debian 12; installs podman, runc, debootstrap, podman-compose and curl when missing.
# The base image (debian:bookworm-slim) is made with debootstrap from the
# machine's Debian mirror (slimmed as Debian's is): no registry is used.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
model=$(readlink -f "${1:-build/models/smollm2-135m}") build=${2:-build}
kvctl=$build/kvctl
[[ -e $model ]] || { echo "docker/test.sh: no model at $model" >&2; exit 1; }
[[ -x $kvctl ]] || { echo "docker/test.sh: build kvctl first ($kvctl)" >&2; exit 1; }

missing=()
for p in podman runc debootstrap podman-compose curl; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "docker/test.sh: apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
fi
export CONTAINERS_CONF=$here/docker/containers.conf
pm() { podman --runtime runc "$@"; }   # crun fails here: "cgroups in hybrid mode not supported"

t0=$(date +%s)
base=docker.io/library/debian:bookworm-slim
if ! pm image exists "$base"; then
  { # (no registry: our network is Debian's mirror and npm's)
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [[ -n $mirror ]] || mirror=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    echo "docker/test.sh: making $base with debootstrap from $mirror"
    root=$(mktemp -d)
    debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
    # as Debian's slim images: no documentation, manuals or translations, now or when installing
    rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/usr/share/info/* \
           "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/*
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
      'path-exclude /usr/share/man/*' 'path-exclude /usr/share/locale/*' 'path-exclude /usr/share/info/*' \
      >"$root/etc/dpkg/dpkg.cfg.d/slim"
    tar -C "$root" -c . | pm import - "$base" >/dev/null
    rm -rf "$root"
  }
fi
echo "== podman build"
pm build -q --format docker --network host -t localhost/kvserve:test -f docker/Dockerfile . >/dev/null
size=$(pm image inspect localhost/kvserve:test --format '{{.Size}}')
echo "image localhost/kvserve:test: $((size / 1000000)) MB (built in $(($(date +%s) - t0)) s)"

free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
name=kvserve-test-$$
tmp=$(mktemp -d)
cleanup() { pm rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap cleanup EXIT

# One container: healthy, then a stream of n tokens with SIGTERM once its first
# token arrived. The stream must end complete (finish length, n generated) and
# the container exit 0 after draining it. If the stream was over before the
# signal (the log says no call was in flight), again with a longer stream.
run_once() {
  local n=$1 port mport
  port=$(free_port) mport=$(free_port)
  pm rm -f "$name" >/dev/null 2>&1 || true
  pm run -d --name "$name" --network host -v "$model:/models/model:ro" \
    -e KVSERVE_LISTEN="127.0.0.1:$port" -e KVSERVE_METRICS_LISTEN="127.0.0.1:$mport" \
    -e KVSERVE_GRACE_SECONDS=600 -e KVSERVE_THREADS=2 localhost/kvserve:test >/dev/null
  local ok=0
  for _ in $(seq 600); do # up to 5 minutes for the model to load
    if pm healthcheck run "$name" >/dev/null 2>&1; then ok=1; break; fi
    [[ $(pm inspect -f '{{.State.Running}}' "$name") == true ]] || break
    sleep 0.5
  done
  if ((!ok)); then pm logs "$name" >&2; echo "FAIL: the container never became healthy" >&2; return 2; fi
  "$kvctl" --addr "127.0.0.1:$port" --timeout 5 health >/dev/null || { echo "FAIL: kvctl health from the host" >&2; return 2; }
  curl -fsS "http://127.0.0.1:$mport/metrics" | grep -q '^kvserve_' || { echo "FAIL: no metrics on $mport" >&2; return 2; }
  "$kvctl" --addr "127.0.0.1:$port" --timeout 600 generate -n "$n" --ignore-eos --temperature 0 "The quick brown fox" \
    >"$tmp/out" 2>"$tmp/err" &
  local kpid=$!
  for _ in $(seq 6000); do [[ -s $tmp/out ]] && break; kill -0 $kpid 2>/dev/null || break; sleep 0.1; done
  pm kill --signal TERM "$name" >/dev/null
  local krc=0 code
  wait $kpid || krc=$?
  code=$(pm wait "$name")
  pm logs "$name" >"$tmp/log" 2>&1
  if grep -q "draining: 0 calls in flight" "$tmp/log"; then return 1; fi # the stream had ended: again, longer
  grep -q "draining: 1 call in flight" "$tmp/log" || { cat "$tmp/log" >&2; echo "FAIL: no drain in the log" >&2; return 2; }
  ((krc == 0)) && grep -q "finish length" "$tmp/err" && grep -q "generated $n " "$tmp/err" ||
    { cat "$tmp/err" >&2; echo "FAIL: the stream did not complete (kvctl exit $krc)" >&2; return 2; }
  [[ $code == 0 ]] || { cat "$tmp/log" >&2; echo "FAIL: the container exited $code" >&2; return 2; }
  echo "PASS: healthy; $n tokens streamed to the host through SIGTERM ($(grep -o 'generated [0-9]* | ttft [0-9]* ms | [0-9.]* t/s' "$tmp/err")); exit 0"
}
echo "== run"
n=128 rc=1
for _ in 1 2 3; do
  rc=0; run_once $n || rc=$?
  ((rc == 1)) || break
  n=$((n * 4))
done
((rc == 0)) || exit 1

echo "== compose"
# Debian's podman-compose (1.0) has no `config`: --dry-run prints the podman commands `up` would
# run (it still creates the project's network and volume, removed after)
proj=kvtest$$
head -c 32 /dev/urandom >"$tmp/export.key"
(cd docker && KVSERVE_MODEL_PATH=$model KVSERVE_EXPORT_KEY_PATH=$tmp/export.key podman-compose -p "$proj" --dry-run -f compose.yaml up -d) >"$tmp/compose" 2>&1 ||
  { cat "$tmp/compose" >&2; echo "FAIL: podman-compose rejects docker/compose.yaml" >&2; exit 1; }
podman volume rm "${proj}_redis-data" >/dev/null 2>&1 || true
podman network rm "${proj}_default" >/dev/null 2>&1 || true
for svc in redis kvserve-1 kvserve-2 lb prometheus; do
  grep -q "^podman run --name=${proj}_${svc}_1 " "$tmp/compose" ||
    { cat "$tmp/compose" >&2; echo "FAIL: compose would not run $svc" >&2; exit 1; }
done
grep -q -- "-v $model:/models/model:ro .*KVSERVE\|-e KVSERVE_REDIS_URL=redis://redis:6379/0 .*-v $model:/models/model:ro" "$tmp/compose" ||
  { cat "$tmp/compose" >&2; echo "FAIL: the replicas would not get the model and Redis" >&2; exit 1; }
echo "PASS: podman-compose runs docker/compose.yaml's redis, kvserve-1, kvserve-2 (model read-only, Redis), lb, prometheus"
echo "docker/test.sh: all passed in $(($(date +%s) - t0)) s"
