#!/usr/bin/env bash
# Installs muster's build and test dependencies from Debian 12 packages. Idempotent: it asks
# apt only for what is missing. CUDA is not installed here; when /usr/local/cuda exists the
# build uses it (see MUSTER_WITH_CUDA).
set -euo pipefail
PKGS=(
  build-essential cmake ninja-build pkg-config git
  libzmq3-dev cppzmq-dev libsodium-dev
  libprotobuf-dev protobuf-compiler
  libspdlog-dev libfmt-dev
  libgtest-dev libgmock-dev googletest
  libsqlite3-dev sqlite3
  libcli11-dev libyaml-cpp-dev nlohmann-json3-dev
  libxxhash-dev libzstd-dev libcurl4-openssl-dev
  # OpenSSL's AES-256-GCM (AES-NI) seals the in-memory snapshot data channel (common/aead.h):
  # libzmq has no faster mechanism than CURVE, and libsodium's own AES-GCM is 3.3x slower here
  libssl-dev
  libgloo-dev
  libopenmpi-dev openmpi-bin
  libtorch-dev python3-torch
  pybind11-dev python3-dev python3-numpy
  clang-14 libclang-rt-14-dev clang-format
  iproute2 procps psmisc
  # the slurm provider's tests run a real Slurm cluster (munged, slurmctld, slurmd) on this machine
  slurmctld slurmd slurm-client munge
  # the coordinator's dashboard (civetweb, prometheus-cpp's text format) and its end-to-end
  # tests (a real Prometheus scraping it; headless Chromium looking at the page)
  libcivetweb-dev prometheus-cpp-dev prometheus chromium
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
