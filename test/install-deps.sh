#!/usr/bin/env bash
# Installs what `make demo`, `make test` and `make lint` need on a fresh
# Debian machine: filesystem tools for mkfs/mount/resize of volumes, FUSE
# userspace (fusermount3 for unmount fallbacks), fio (test/bench-io's smoke
# test), and the Go linters.
# Idempotent; needs root for apt.
set -euo pipefail

PACKAGES=(e2fsprogs xfsprogs fuse3 util-linux mount kmod etcd-server fio)
STATICCHECK_VERSION=v0.8.2

missing=()
for p in "${PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	echo "install-deps: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

gobin=$(go env GOPATH)/bin
if ! "$gobin/staticcheck" -version 2>/dev/null | grep -q "${STATICCHECK_VERSION#v}"; then
	echo "install-deps: installing staticcheck $STATICCHECK_VERSION"
	go install "honnef.co/go/tools/cmd/staticcheck@$STATICCHECK_VERSION"
fi

# Loop devices: the kernel makes more on demand through /dev/loop-control;
# make sure the module is there when it is not built in.
[ -e /dev/loop-control ] || modprobe loop || true
echo "install-deps: ok"
