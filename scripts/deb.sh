#!/usr/bin/env bash
# Builds the Debian package: target/debian/qsysd_<version>-1_<arch>.deb.
# Needs cargo-deb (installed here with `cargo install cargo-deb --locked` if missing) and gzip.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deb --version >/dev/null 2>&1; then
  echo "deb: installing cargo-deb"
  cargo install cargo-deb --locked --quiet
fi
cargo build --release --locked --bins
mkdir -p target/man
for page in packaging/man/*.[0-9]; do
  gzip -9 -n -c "$page" > "target/man/$(basename "$page").gz"
done
cargo deb --no-build --locked
ls -1 target/debian/*.deb
