#!/usr/bin/env bash
# The test command (README, CI): makes sure Redis and MariaDB run (installing them if missing),
# installs promtool and headless Chromium for the tests, checks formatting and lints, builds and
# tests the Debian package (scripts/test-deb.sh; needs root), and runs every unit and integration
# test against the real servers. Fails loudly if a service cannot be reached; nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
# promtool checks /metrics (tests/ops.rs); Debian ships it in the prometheus package.
# Installing the package on a systemd machine also starts a Prometheus server (enabled by the
# package); the tests only need its promtool.
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v promtool >/dev/null; then
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# Headless Chromium and chromedriver drive the dashboard (tests/dashboard.rs).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
# schemathesis checks docs/openapi.json against a running daemon (tests/ops.rs); a pinned version
# from PyPI in a virtualenv of its own under target/.
if [ ! -x target/schemathesis/bin/st ]; then
  if ! python3 -m venv target/schemathesis; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -m venv target/schemathesis
  fi
  target/schemathesis/bin/pip install -q schemathesis==4.32.5
fi
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
# The docs build without a broken link, private items included (they are the architecture's).
RUSTDOCFLAGS="-D warnings -A rustdoc::private_intra_doc_links" \
  cargo doc --no-deps --lib --document-private-items --locked -p qsysd
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Every test binary runs even when one fails, and the closing line is always printed.
status=0
bash scripts/test-deb.sh 2>&1 | tee "$log" || status=1
# Binaries and examples have no tests of their own; clippy above has built them. The workspace
# holds the patched tiny_http (vendor/), whose own tests run too.
cargo test --workspace --no-fail-fast --lib --tests --locked 2>&1 | tee -a "$log" || status=1
# One closing line over every test binary and the package checks.
awk '/^test result:/ { p += $4; f += $6 }
     /^test-deb: [0-9]+ passed/ { p += $2; f += $4 }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
