#!/usr/bin/env bash
# Install the npm dependencies of the Node.js interop tests, if there are any.
#
# If tests/interop/package.json exists and tests/interop/node_modules is
# missing or was installed from another package-lock.json (a copy of the lock
# it came from is kept in node_modules), run `npm ci` there (or `npm install`
# when there is no lock file). Otherwise do nothing. Called by
# `make node-deps` and `make test`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=tests/interop

if [ ! -f "$dir/package.json" ]; then
    echo "[node-deps] no $dir/package.json: nothing to do"
    exit 0
fi
stamp=node_modules/.rounds-installed-from-lock
if [ -d "$dir/node_modules" ] && { [ ! -f "$dir/package-lock.json" ] || cmp -s "$dir/package-lock.json" "$dir/$stamp"; }; then
    echo "[node-deps] $dir/node_modules already present"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "[node-deps] npm is not installed; cannot install $dir dependencies" >&2
    exit 1
fi

cd "$dir"
if [ -f package-lock.json ] || [ -f npm-shrinkwrap.json ]; then
    echo "[node-deps] npm ci in $dir"
    npm ci --no-audit --no-fund
    if [ -f package-lock.json ]; then cp package-lock.json "$stamp"; fi
else
    echo "[node-deps] npm install in $dir (no lock file)"
    npm install --no-audit --no-fund
fi
