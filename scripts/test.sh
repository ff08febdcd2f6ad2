#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine and runs it.
#   bash scripts/test.sh [pytest args...]
# Debian packages: docker.io (the real engine the tests start with --bridge=none
# --iptables=false --ip-masq=false), busybox-static (the FROM-scratch test image),
# bind9-dnsutils (dig), dnsmasq (a second DNS server for forwarding tests), iproute2 and
# util-linux (ip netns and nsenter: the fleet tests' hosts are network namespaces),
# openssh-server and openssh-client (a fleet host's engine reached at ssh://), chromium and
# fonts-dejavu-core (the dashboard's browser tests drive chromium headless through
# Playwright and compare screenshots rendered in DejaVu).
set -euo pipefail
cd "$(dirname "$0")/.."

debs=(docker.io busybox-static bind9-dnsutils dnsmasq-base iproute2 util-linux openssh-server openssh-client
      chromium fonts-dejavu-core)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure of the suite, not a pass.
exit $rc
