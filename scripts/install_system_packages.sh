#!/usr/bin/env bash
# Install the Debian packages that some tests need, where this machine can (root with apt-get); elsewhere print
# one line and exit 0 (those tests then skip with a one-line reason, unless AMAX_REQUIRE_* turns that into a failure).
#   chromium, chromium-driver   the browser tests of report.html (tests/e2e/test_report_browser.py)
#   slurm-wlm, munge            the single-host SLURM of the cluster tests (tests/e2e/test_slurm.py)
set -euo pipefail
PACKAGES=(chromium chromium-driver slurm-wlm munge)
missing=()
for package in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "setup: not root with apt-get: skipping ${missing[*]} (browser and SLURM tests will skip)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
