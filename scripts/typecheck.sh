#!/usr/bin/env bash
# mypy over the package `rounds`, whose parts live in the top-level folders
# shard/, frontdoor/, cluster/ and bench/ (pyproject.toml, package-dir). mypy
# cannot follow the editable install's import hook, so it is given the package
# as installed: a tree of symlinks in .typecheck/ (rebuilt each run, ignored by
# git). Settings: [tool.mypy] in pyproject.toml. Called by `make typecheck`
# and `make test`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
tree=.typecheck
rm -rf "$tree"
mkdir -p "$tree/rounds"
for entry in rounds/*; do
    case "$entry" in */__pycache__) continue ;; esac
    ln -s "$PWD/$entry" "$tree/rounds/$(basename "$entry")"
done
for part in shard frontdoor cluster bench; do
    ln -s "$PWD/$part" "$tree/rounds/$part"
done
MYPYPATH="$tree" exec "${MYPY:-.venv/bin/mypy}" --config-file pyproject.toml -p rounds "$@"
