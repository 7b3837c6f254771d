#!/usr/bin/env bash
# setup.sh - install the Debian packages kvtrace needs (only those missing), then configure
# and build into build/. Safe to re-run. Usage: bash scripts/setup.sh [build-dir | --packages]
# (--packages: install the packages only; scripts/device_bundle.sh builds its own tree)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}

PKGS=(build-essential cmake ninja-build pkg-config git
      libzstd-dev zstd libcjson-dev libpng-dev zlib1g-dev libcairo2-dev libfontconfig-dev
      python3-numpy python3-torch clang-format libopenblas-dev
      clang libclang-rt-14-dev valgrind chromium libjs-chart.js libopenmpi-dev openmpi-bin)
missing=()
for p in "${PKGS[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "setup: error: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
        SUDO=sudo
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ "$BUILD" = --packages ] && exit 0
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVT_WERROR=ON >/dev/null
cmake --build "$BUILD" -j"$(nproc)"
