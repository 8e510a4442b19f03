#!/usr/bin/env bash
# Install what tests/test_report.py needs to render the Snakemake report: Debian's headless-capable
# `chromium` (Debian 12 ships it from bookworm-security) and fonts, so the screenshot shows text.
# Idempotent: skipped when chromium is already on PATH. Needs root on Debian/Ubuntu (CI: fresh Debian 12).
set -euo pipefail

if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-chromium.sh: needs root to apt-get install chromium" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends: the recommends pull a desktop (pulseaudio, upower, GTK themes) we don't use.
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
fi

echo "install-chromium.sh: $(chromium --version 2>/dev/null || echo 'chromium --version failed')"
