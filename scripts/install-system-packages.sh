#!/usr/bin/env bash
# Installs the Debian packages podwatch's tests and demo use (real brokers and independent clients).
# Root: apt-get installs what is missing. Not root: say exactly what to run, and go on.
set -u
missing=()
for pkg in "$@"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
  echo "podwatch: installing system packages: ${missing[*]}"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "podwatch: missing system packages: ${missing[*]}" >&2
  echo "podwatch: run: sudo apt-get install -y ${missing[*]}" >&2
  echo "podwatch: tests that need them will fail until they are installed." >&2
fi
