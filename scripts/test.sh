#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: install what is
# missing, build, run every test (CTest), then the same suite under
# AddressSanitizer + UndefinedBehaviorSanitizer, then the container image
# (built and run with podman), then the libFuzzer targets for a bounded time. Exit status non-zero if anything fails.
#   KVSERVE_SKIP_SANITIZE=1  skip the sanitizer pass
#   KVSERVE_SKIP_CONTAINER=1 skip the container image test (docker/test.sh, podman)
#   KVSERVE_FUZZ_SECONDS=N   libFuzzer time per target (default 30; 0 skips)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install-deps.sh

models=$PWD/build/models
echo "== build (RelWithDebInfo)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVSERVE_WERROR=ON -DKVSERVE_MODELS_DIR="$models" >/dev/null
cmake --build build -j2
echo "== tests"
(cd build && ctest --output-on-failure)

if [[ ${KVSERVE_SKIP_SANITIZE:-0} != 1 ]]; then
  echo "== build (ASan + UBSan)"
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVSERVE_SANITIZE=ON -DKVSERVE_WERROR=ON \
        -DKVSERVE_MODELS_DIR="$models" >/dev/null
  cmake --build build-asan -j2
  echo "== tests under ASan + UBSan"
  (cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
     ctest --output-on-failure)
fi

if [[ ${KVSERVE_SKIP_CONTAINER:-0} != 1 ]]; then
  echo "== container image (docker/test.sh)"
  bash docker/test.sh "$models/smollm2-135m" build
fi

secs=${KVSERVE_FUZZ_SECONDS:-30}
if [[ $secs != 0 ]] && command -v clang >/dev/null; then
  echo "== libFuzzer (${secs}s)"
  cmake -S . -B build-fuzz -DCMAKE_C_COMPILER=clang -DKVSERVE_FUZZ=ON -DKVSERVE_SANITIZE=ON -DKVSERVE_WERROR=ON \
        -DKVSERVE_MODELS_DIR="$models" -DBUILD_TESTING=ON >/dev/null
  cmake --build build-fuzz -j2 --target fuzz_loader fuzz_gguf
  for t in loader:corpus gguf:corpus_gguf; do # each target its own seconds, from its own seeds
    corpus=$(mktemp -d)
    cp "tests/fuzz/${t#*:}"/* "$corpus"/
    echo "-- fuzz_${t%%:*}"
    build-fuzz/tests/fuzz_${t%%:*} -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 "$corpus" 2>&1 | tail -n 12
    rm -rf "$corpus"
  done
fi
echo "== all tests passed"
