#!/usr/bin/env bash
# System packages for the remote-runner tests (run as root after .ci/system-deps.sh; idempotent).
#
#   openssh-server, openssh-client  a real sshd on 127.0.0.1 for the ssh runner's tests
#   dropbear-bin                    a real dropbear (the ssh server of embedded images) on 127.0.0.1,
#                                   with no SFTP server and no scp for it: the ssh runner's fallback
#   adb, adbd (bookworm-backports)  a real adb server and Debian's adbd, which serves
#                                   `adb shell`/`adb push` over TCP on 127.0.0.1
#
# .ci/system-deps.sh adds the bookworm-backports source; this script adds it the same way if it
# is missing (first Debian mirror already in the apt sources, never a hard-coded host).
# Services are never started here: the tests start their own sshd and adbd on free ports.
set -euo pipefail

log() { echo "remote-deps: $*" >&2; }

need_ssh=0; need_adb=0; need_dropbear=0
[ -x /usr/sbin/sshd ] && command -v ssh >/dev/null 2>&1 && command -v scp >/dev/null 2>&1 \
  && command -v ssh-keygen >/dev/null 2>&1 || need_ssh=1
command -v adb >/dev/null 2>&1 && command -v adbd >/dev/null 2>&1 || need_adb=1
[ -x /usr/sbin/dropbear ] && command -v dropbearkey >/dev/null 2>&1 || need_dropbear=1
if [ "$need_ssh" = 0 ] && [ "$need_adb" = 0 ] && [ "$need_dropbear" = 0 ]; then
  log "openssh $(ssh -V 2>&1 | cut -d, -f1), $(adb version 2>/dev/null | head -n1), adbd and dropbear already installed"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  log "not root; skipping (install openssh-server openssh-client dropbear-bin, and adb adbd from bookworm-backports, yourself)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  log "no apt-get on this system; skipping"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
. /etc/os-release
codename="${VERSION_CODENAME:-}"

backports=""
if [ "${ID:-}" = debian ] && [ "$codename" = bookworm ]; then
  . "$(dirname "$0")/backports.sh"
  add_bookworm_backports || exit 1
  backports="-t bookworm-backports"
fi

# Never start the packaged services (no init here; the tests run their own daemons).
restore_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  restore_policy=1
fi
cleanup() { if [ -n "$restore_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT

apt-get update -qq
if [ "$need_ssh" = 1 ]; then
  # the server from the stable suite, matching the client it pulls along
  apt-get install -y -qq openssh-server openssh-client >/dev/null
  log "installed $(ssh -V 2>&1 | cut -d, -f1) (sshd at /usr/sbin/sshd)"
fi
if [ "$need_dropbear" = 1 ]; then
  # the server binaries only (dropbear-bin): no init script, no service; the tests start their own
  apt-get install -y -qq dropbear-bin >/dev/null
  log "installed dropbear $(dpkg-query -W -f='${Version}' dropbear-bin) (/usr/sbin/dropbear)"
fi
if [ "$need_adb" = 1 ]; then
  # adbd exists only in bookworm-backports (and newer); adb from the same suite so versions match
  # shellcheck disable=SC2086
  apt-get install -y -qq $backports adb adbd >/dev/null
  log "installed $(adb version | head -n1) and adbd $(dpkg-query -W -f='${Version}' adbd)"
fi
