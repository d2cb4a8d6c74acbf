#!/usr/bin/env bash
# System packages the test suite needs (run as root; idempotent).
#
# LiteRT's GPU accelerator needs a Vulkan driver. On machines without a GPU we use
# Mesa's software Vulkan driver (lavapipe). LiteRT rejects Debian 12's Mesa 22.3,
# so Mesa 25 comes from the bookworm-backports suite of the same Debian mirror the
# machine already uses (read from its apt sources, never hard-coded here).
set -euo pipefail

log() { echo "system-deps: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "not root; skipping (install mesa-vulkan-drivers>=25 and libvulkan1 yourself for the gpu tests)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  log "no apt-get on this system; skipping"
  exit 0
fi

mesa_major() {
  dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | sed -E 's/^([0-9]+:)?([0-9]+).*/\2/'
}

have="$(mesa_major || true)"
if [ -n "$have" ] && [ "$have" -ge 25 ] && dpkg-query -W libvulkan1 >/dev/null 2>&1; then
  log "mesa-vulkan-drivers $have and libvulkan1 already installed"
  exit 0
fi

. /etc/os-release
codename="${VERSION_CODENAME:-}"
export DEBIAN_FRONTEND=noninteractive

if [ "${ID:-}" = debian ] && [ "$codename" = bookworm ]; then
  . "$(dirname "$0")/backports.sh"
  add_bookworm_backports || exit 1
  apt-get update -qq
  apt-get install -y -qq -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null
else
  apt-get update -qq
  apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
fi
log "installed mesa-vulkan-drivers $(dpkg-query -W -f='${Version}' mesa-vulkan-drivers) and libvulkan1"
