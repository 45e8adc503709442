#!/usr/bin/env bash
# Debian's chromium for the app's headless browser test (tests/test_app_browser.py), which
# Playwright drives as the system browser: Playwright's own browser download is never used.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version
