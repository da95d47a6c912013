#!/usr/bin/env bash
# Builds the Debian package: target/debian/qsysd_<version>-1_<arch>.deb. A wrapper around plain
# `cargo deb`, which works as is: it only installs cargo-deb first if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deb --version >/dev/null 2>&1; then
  echo "deb: installing cargo-deb"
  cargo install cargo-deb --locked --quiet
fi
cargo deb --locked
ls -1 target/debian/*.deb
