#!/bin/sh
# The seeded crash campaign: tests/campaign.sh N [SEED]
# Builds the binaries (the agent with its failpoints) and runs N scenarios from SEED.
# A failing seed S replays alone: tests/campaign.sh 1 S
set -eu
cd "$(dirname "$0")/.."
N="${1:-20}"
SEED="${2:-1}"
cargo build --workspace --bins
CAMPAIGN_SEEDS="$N" CAMPAIGN_SEED="$SEED" \
    cargo test -p siterecovery-tests --test campaign -- --nocapture
