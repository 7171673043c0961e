#!/usr/bin/env bash
# Builds the Debian packages siterecovery-provider and siterecovery-agent with cargo deb
# into target/debian/ (one release build for both) and prints the .deb paths.
#
#     dist/package.sh            # then: dpkg -i target/debian/siterecovery-*.deb
#     SR_DEB_FAST=1 dist/package.sh   # faster, larger compression (the packages test)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "cargo-deb is missing: cargo install cargo-deb --locked" >&2
    exit 1
fi
# Only the two daemons' crates: the release binaries carry no test features (failpoints).
cargo build --release --locked -p siterecovery-provider -p siterecovery-agent --bins >&2
fast=""
[ "${SR_DEB_FAST:-0}" = 1 ] && fast="--fast"
for pkg in siterecovery-provider siterecovery-agent; do
    cargo deb --no-build --locked $fast -p "$pkg"
done
