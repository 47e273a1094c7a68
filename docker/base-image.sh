#!/usr/bin/env bash
# Builds the Dockerfile's base image offline, from Debian packages, for machines that cannot pull
# python:3.11-slim (air-gapped, or behind a proxy without a container registry):
#
#   docker/base-image.sh [TAG]        # TAG defaults to python:3.11-slim, the Dockerfile's PYTHON_IMAGE
#   make base-image                   # the same
#
# - debootstrap --variant=minbase bookworm, from the Debian mirror apt is configured with here
#   (DEBIAN_MIRROR overrides it), plus python3.11, its venv module and `python`;
# - the extra CA certificates this host trusts (update-ca-certificates' local ones, in
#   /usr/local/share/ca-certificates) are trusted in the image too, so that pip and apt verify TLS
#   through a proxy that intercepts it;
# - `docker import`, tagged TAG, with the environment the official image sets.
# Needs root (debootstrap) and the debootstrap package.
set -euo pipefail

tag=${1:-python:3.11-slim}
suite=bookworm

# The first deb.debian.org-style "debian" mirror of the host's apt sources (deb822 or one-line).
configured_mirror() {
    apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null \
        | awk -v suite="$suite" '$2 == suite { print $1; exit }'
}
mirror=${DEBIAN_MIRROR:-$(configured_mirror)}
mirror=${mirror:-http://deb.debian.org/debian}

[ "$(id -u)" -eq 0 ] || { echo "debootstrap needs root: sudo $0 $*" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "install debootstrap (apt-get install debootstrap)" >&2; exit 1; }

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT

echo "bootstrapping $suite from $mirror"
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror"
# Installed by apt in the new system rather than by debootstrap's --include, which cannot order
# python3.11-venv's dependencies.
chroot "$rootfs" apt-get update -qq
DEBIAN_FRONTEND=noninteractive chroot "$rootfs" apt-get install -y -qq --no-install-recommends \
    python3.11 python3.11-venv python-is-python3 ca-certificates

# The host's local CAs, trusted by the image's OpenSSL bundle (which pip is told to use below).
shopt -s nullglob
local_cas=(/usr/local/share/ca-certificates/*.crt)
if [ ${#local_cas[@]} -gt 0 ]; then
    echo "trusting the host's local CA certificates: ${local_cas[*]##*/}"
    cp "${local_cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates
fi

# What an image needs none of: package lists and caches, documentation.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* \
    "$rootfs"/usr/share/info/* "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/log/*.log

tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    - "$tag"
echo "tagged $tag"
