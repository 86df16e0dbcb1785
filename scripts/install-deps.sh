#!/usr/bin/env bash
# Install everything kvserve needs to build, run and test on Debian 12 (as root).
# Idempotent: installs only what is missing. Debian packages through apt-get,
# JavaScript test tools through npm (tests/js/package-lock.json).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

#   KVSERVE_DEPS=build  only what building kvserve and kvctl needs (docker/Dockerfile's build stage)
build_pkgs=(
  build-essential cmake pkg-config ca-certificates
  libopenblas-dev libcjson-dev libpcre2-dev libssl-dev libutf8proc-dev
  libgrpc-dev protobuf-compiler libprotobuf-c-dev protobuf-c-compiler
  libhiredis-dev libmicrohttpd-dev libedit-dev
)
pkgs=(
  build-essential cmake pkg-config git ca-certificates
  clang libclang-rt-14-dev            # libFuzzer + sanitizer runtimes
  libopenblas-dev libcjson-dev libpcre2-dev libssl-dev libutf8proc-dev
  libgrpc-dev protobuf-compiler libprotobuf-c-dev protobuf-c-compiler   # RPC layer
  python3-grpcio python3-protobuf     # an independent gRPC client in tests
  python3-jinja2                      # an independent chat-template renderer in tests
  openssl                             # test certificates
  libhiredis-dev redis-server         # caches (the tests start their own redis-server)
  haproxy                             # the gRPC load balancer of the scale-out test
  libmicrohttpd-dev                   # metrics over HTTP
  libedit-dev                         # kvctl chat: line editing and history
  python3 python3-numpy python3-regex # reference implementation, model generator
  wamerican                           # a word list: the trained model's generations are English
  nodejs npm                          # @huggingface/tokenizers, @grpc/grpc-js tests
)

if [[ ${KVSERVE_DEPS:-all} == build ]]; then pkgs=("${build_pkgs[@]}"); fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
# Node may come from another Debian-format repository (same binary path); accept it.
if command -v node >/dev/null && command -v npm >/dev/null; then
  m2=(); for p in "${missing[@]}"; do [[ $p == nodejs || $p == npm ]] || m2+=("$p"); done
  missing=("${m2[@]+"${m2[@]}"}")
fi
if ((${#missing[@]})); then
  echo "install-deps: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# npm ci again whenever package-lock.json changed since the last install
js=$here/tests/js
if [[ ${KVSERVE_DEPS:-all} != build && -f $js/package-lock.json ]]; then
  want=$(sha256sum "$js/package-lock.json" | cut -d' ' -f1)
  if [[ ! -d $js/node_modules || $(cat "$js/node_modules/.kvserve-lock" 2>/dev/null) != "$want" ]]; then
    echo "install-deps: npm ci (tests/js)"
    (cd "$js" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$want" >"$js/node_modules/.kvserve-lock"
  fi
fi
