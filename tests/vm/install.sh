#!/usr/bin/env bash
# Install what the VM test layer (tests/vm) needs on a Debian 12 machine, as root.
#
#   tests/vm/install.sh [VENV]      (VENV defaults to <repo>/.venv)
#
# Idempotent and quiet: prints nothing unless something fails, and then the
# log of the failing step. Skips apt entirely when every package is present,
# so repeated `make test` runs stay fast.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-$repo/.venv}"

# Why each package (found by trying on a fresh machine):
#   qemu-system-x86    QEMU itself; also brings SeaBIOS for the q35 boot.
#   linux-image-amd64  Debian's stock kernel: ip_vs, dummy, 9p are modules
#                      in /lib/modules/<ver>, which the guest loads from the
#                      shared host root.
#   busybox-static     virtme-ng builds its initramfs (needed to load the 9p
#                      modules before mounting /) from a busybox binary; it
#                      refuses to boot this kernel without one.
#   kmod               modprobe inside the guest.
#   iproute2 iptables ipset
#                      tools the inside-tests call (the guest runs the
#                      host's binaries).
packages=(qemu-system-x86 linux-image-amd64 busybox-static kmod iproute2 iptables ipset)
# virtme-ng is pinned: the runner relies on its CLI (--force-9p,
# --qemu-opts, exit-code passing) and its guest init.
virtme_ng="virtme-ng==1.42"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT

run() {
    if ! "$@" >>"$log" 2>&1; then
        echo "tests/vm/install.sh: failed: $*" >&2
        cat "$log" >&2
        exit 1
    fi
}

if [ "$(id -u)" -ne 0 ]; then
    echo "tests/vm/install.sh: must run as root (apt-get)" >&2
    exit 1
fi

missing=()
for pkg in "${packages[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
    [ "$status" = installed ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    run apt-get update -q
    # No recommends: they pull in firmware, OVMF, GUI bits, none of which a
    # -kernel boot without network uses.
    run apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "tests/vm/install.sh: no Python venv at $venv (create it first)" >&2
    exit 1
fi
if ! "$venv/bin/python" -m pip show -q virtme-ng >/dev/null 2>&1 \
    || [ "$("$venv/bin/python" -m pip show virtme-ng 2>/dev/null | sed -n 's/^Version: //p')" != "${virtme_ng#*==}" ]; then
    run "$venv/bin/python" -m pip install -q "$virtme_ng"
fi
