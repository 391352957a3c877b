#!/bin/sh
# Install the Debian packages the tests drive as real daemons, when missing:
#   nginx          a forking daemon with a PID file (tests/test_real_daemons.py)
#   redis-server   a daemon that speaks sd_notify (tests/test_real_daemons.py)
#   systemd        for systemd-notify, the sd_notify client in tests' scripts
#   prometheus     a real Prometheus server (and promtool) scraping ikosd
#                  (tests/prometheus.py, tests/test_prometheus.py)
#   dnsmasq-base   dnsmasq without its system service: the DHCP and DNS server
#                  the network manager example meets (tests/test_example_net.py)
#   bsdutils       logger(1), the syslog client (tests/test_example_log.py)
#   memcached      Debian's memcached.service (Type=simple) and memcached@.service
#                  (a template) run unchanged (tests/test_units_debian.py)
#   haproxy        Debian's haproxy.service (Type=notify, $VAR in Exec lines, two
#                  ExecReload commands) run unchanged (tests/test_units_debian.py)
# A fast no-op when they are installed. As root, apt-get installs what is
# missing, non-interactively and quietly, with no service started by the
# packages' scripts (they would take ports 80, 6379, 9090 and 11211 system-wide; the tests
# start their own instances). Anyone else gets one line saying what is
# missing, and the tests that need it are skipped with that reason.
set -eu

PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
missing=""
command -v nginx >/dev/null 2>&1 || missing="$missing nginx"
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
command -v systemd-notify >/dev/null 2>&1 || missing="$missing systemd"
command -v prometheus >/dev/null 2>&1 || missing="$missing prometheus"
command -v dnsmasq >/dev/null 2>&1 || missing="$missing dnsmasq-base"
command -v logger >/dev/null 2>&1 || missing="$missing bsdutils"
command -v memcached >/dev/null 2>&1 || missing="$missing memcached"
command -v haproxy >/dev/null 2>&1 || missing="$missing haproxy"
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "test-deps: not installed:$missing; the tests that need them will be skipped" \
        "(install them as root: scripts/test-deps.sh)" >&2
    exit 0
fi

echo "test-deps: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
# Keep services from starting during the install (Debian's policy-rc.d
# protocol, honoured by invoke-rc.d and deb-systemd-invoke), unless the
# machine already has a policy of its own (as container images do).
policy=/usr/sbin/policy-rc.d
out=$(mktemp)
cleanup="rm -f '$out'"
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, from ikos scripts/test-deps.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    cleanup="$cleanup '$policy'"
fi
trap 'eval "$cleanup"' EXIT
apt() {
    # quiet unless it fails; waits for another apt/dpkg to finish rather than fail on its lock
    if ! apt-get -qq -o DPkg::Lock::Timeout=600 "$@" >"$out" 2>&1; then
        cat "$out" >&2
        echo "test-deps: apt-get $* failed" >&2
        exit 1
    fi
}
apt update
# shellcheck disable=SC2086 # one word per package
apt -y --no-install-recommends -o Dpkg::Options::=--force-confdef \
    -o Dpkg::Options::=--force-confold install $missing
