#!/usr/bin/env bash
# System packages for the ledger and sweep tests (run as root; idempotent).
#
#   postgresql   a real PostgreSQL server: the ledger tests run on SQLite and on PostgreSQL
#   chromium     a headless browser: the history page is opened, screenshotted and its requests logged
#   strace       the sweep's cluster tests log every connect()/bind() of the Ray processes they start
#
# Services are never started here: the tests start their own PostgreSQL cluster in a temporary
# folder (unix socket only, as the postgres user) and stop it by its pid.
set -euo pipefail

log() { echo "service-deps: $*" >&2; }

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need+=(chromium)
command -v strace >/dev/null 2>&1 || need+=(strace)
if [ "${#need[@]}" = 0 ]; then
  log "postgresql ($(ls -d /usr/lib/postgresql/*/ | xargs -n1 basename | tr '\n' ' '| sed 's/ $//')), chromium and strace already installed"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  log "not root; skipping (install ${need[*]} yourself for the ledger's PostgreSQL and browser tests and the sweep's network checks)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  log "no apt-get on this system; skipping"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive

# Never start the packaged services (no init here; the tests run their own server).
restore_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  restore_policy=1
fi
cleanup() { if [ -n "$restore_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT

apt-get update -qq
apt-get install -y -qq "${need[@]}" >/dev/null
log "installed ${need[*]}"
