#!/usr/bin/env bash
# Install the Debian packages the test suite runs beside Python and Node.js:
#
#   faketime   runs the date-sensitive tests under shifted clocks
#              (tests/calendar/: a month end, a year end, a leap day)
#
# Each is installed with apt-get only when its command is missing; as root
# (or with sudo), from the machine's configured Debian mirrors. Without
# either, it says what is missing and exits 1: the suite cannot prove what
# it is meant to prove without them. Called by `make system-deps` and
# `make test`.
set -euo pipefail

declare -A PACKAGE_OF=([faketime]=faketime)
missing=()
for command in "${!PACKAGE_OF[@]}"; do
    command -v "$command" >/dev/null 2>&1 || missing+=("${PACKAGE_OF[$command]}")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "[system-deps] present: ${!PACKAGE_OF[*]}"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    apt=(apt-get)
elif command -v sudo >/dev/null 2>&1; then
    apt=(sudo apt-get)
else
    echo "[system-deps] missing Debian packages: ${missing[*]}; install them as root" >&2
    exit 1
fi
echo "[system-deps] installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${apt[@]}" install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    "${apt[@]}" update -q >/dev/null
    "${apt[@]}" install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}
echo "[system-deps] installed ${missing[*]}"
