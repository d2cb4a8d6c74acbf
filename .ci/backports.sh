# Sourced by .ci/system-deps.sh and .ci/remote-deps.sh (needs a `log` function).
# add_bookworm_backports: on Debian 12, add the bookworm-backports suite of the Debian mirror the
# machine already uses (read from its apt sources, never a hard-coded host). Returns 1 if no
# mirror is found; does nothing when the suite is already configured.
add_bookworm_backports() {
  if grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null; then
    return 0
  fi
  local uri list=/etc/apt/sources.list.d/backports.list keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  # First Debian (non-security) URI in use, from deb822 or one-line sources.
  uri="$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)"
  if [ -z "$uri" ]; then
    uri="$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
           | grep ' bookworm ' | grep -v security | awk '{ for (i=2;i<=NF;i++) if ($i !~ /^\[/) { print $i; exit } }' | head -n1 || true)"
  fi
  if [ -z "$uri" ]; then
    log "cannot find the Debian mirror in the apt sources; add bookworm-backports yourself"
    return 1
  fi
  if [ -f "$keyring" ]; then
    echo "deb [signed-by=$keyring] $uri bookworm-backports main" > "$list"
  else
    echo "deb $uri bookworm-backports main" > "$list"
  fi
  log "added $list"
}
