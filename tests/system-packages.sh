#!/usr/bin/env bash
# The Debian packages the tests need, installed with apt when missing (as root, or through sudo):
# - pocketsphinx-testdata: real human recordings with reference transcripts (the Whisper tests,
#   the real stack's tests and the speech benchmarks hear them);
# - docker-compose: the compose tests validate the files with `docker-compose config`, and the
#   Docker tests (tests/test_docker.py) run the stacks with it;
# - docker.io: the Docker engine those tests run the images on (they start dockerd when none runs);
# - debootstrap: `make images` builds the base image offline with it when python:3.11-slim
#   cannot be pulled (docker/base-image.sh);
# - chromium: the gateway's browser tests drive it through playwright (no browser download).
set -euo pipefail
packages=()
command -v docker-compose >/dev/null || packages+=(docker-compose)
command -v dockerd >/dev/null || packages+=(docker.io)
command -v debootstrap >/dev/null || packages+=(debootstrap)
[ -f /usr/share/pocketsphinx/test/data/goforward.raw ] || packages+=(pocketsphinx-testdata)
[ -x /usr/bin/chromium ] || packages+=(chromium)
[ ${#packages[@]} -eq 0 ] && exit 0
echo "installing Debian packages the tests need: ${packages[*]}"
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}"
