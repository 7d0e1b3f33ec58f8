#!/usr/bin/env bash
# Installs the system packages meshfed's lab, faults, benchmarks and browser tests use.
# Idempotent: does nothing when every tool is already present. Needs root (or sudo) on Debian/Ubuntu.
set -euo pipefail

need=()
command -v git >/dev/null 2>&1       || need+=(git)
command -v ip >/dev/null 2>&1        || need+=(iproute2)
command -v iptables >/dev/null 2>&1  || need+=(iptables)
command -v haproxy >/dev/null 2>&1   || need+=(haproxy)
command -v faketime >/dev/null 2>&1  || need+=(faketime)
command -v unshare >/dev/null 2>&1   || need+=(util-linux)
command -v nsenter >/dev/null 2>&1   || need+=(util-linux)
command -v openssl >/dev/null 2>&1   || need+=(openssl)
# the web console's browser tests: Playwright (PyPI) drives Debian's Chromium (its own browser
# download is not used); DejaVu for legible screenshots
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need+=(chromium)
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "meshfed setup: missing ${need[*]} and no apt-get here; install them with your package manager" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "meshfed setup: missing ${need[*]}; run as root or install them (lab tests will be skipped)" >&2
        exit 0
    fi
fi
echo "meshfed setup: installing ${need[*]}" >&2
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
