#!/usr/bin/env bash
# The Debian packages voicepipe needs beyond its wheels, installed with apt when missing (as root,
# or through sudo): `system-packages.sh runtime` for the engines (`make install`), `system-packages.sh
# tests` for those and the tests' (`make test`, `make chaos`).
# - runtime: those the engines need beyond their wheels (a system library a wheel links against,
#   which a minimal Debian may lack), as the engine registry names them
#   (`python -m voicepipe.engines debian-packages`, run with $PYTHON, by default python3);
# - tests: pocketsphinx-testdata: real human recordings with reference transcripts (the Whisper
#   tests, the real stack's tests and the speech benchmarks hear them);
# - docker-compose: the compose tests validate the files with `docker-compose config`, and the
#   Docker tests (tests/test_docker.py) run the stacks with it;
# - docker.io: the Docker engine those tests run the images on (they start dockerd when none runs);
# - debootstrap: `make images` builds the base image offline with it when python:3.11-slim
#   cannot be pulled (docker/base-image.sh);
# - chromium: the gateway's browser tests drive it through playwright (no browser download).
set -euo pipefail
case "${1:-}" in
runtime | tests) ;;
*) echo "usage: $0 runtime|tests" >&2; exit 2 ;;
esac
packages=()
# Asked of dpkg, not of the files: where a library is there without dpkg knowing, apt installs the
# package over it once.
installed() { [[ $(dpkg-query -W -f='${Status} ' "$1" 2>/dev/null) == *"install ok installed"* ]]; }
engine_packages=$(cd "$(dirname "$0")/.." && "${PYTHON:-python3}" -m voicepipe.engines debian-packages)
for package in $engine_packages; do
installed "$package" || packages+=("$package")
done
if [ "$1" = tests ]; then
command -v docker-compose >/dev/null || packages+=(docker-compose)
command -v dockerd >/dev/null || packages+=(docker.io)
command -v debootstrap >/dev/null || packages+=(debootstrap)
[ -f /usr/share/pocketsphinx/test/data/goforward.raw ] || packages+=(pocketsphinx-testdata)
[ -x /usr/bin/chromium ] || packages+=(chromium)
fi
[ ${#packages[@]} -eq 0 ] && exit 0
echo "installing Debian packages voicepipe needs ($1): ${packages[*]}"
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}"
