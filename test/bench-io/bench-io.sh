#!/usr/bin/env bash
# make bench-io: installs fio (and mkfs.ext4) if missing, builds
# test/bench-io and runs it. Arguments go to the program (see -help); the
# Makefile passes BENCH_IO_FLAGS. Needs root.
set -euo pipefail

missing=()
command -v fio >/dev/null || missing+=(fio)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
if ((${#missing[@]})); then
	echo "bench-io: installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
[ -e /dev/loop-control ] || modprobe loop || true
[ -e /dev/fuse ] || modprobe fuse || true

cd "$(dirname "$0")/../.."
mkdir -p bin
go build -o bin/bench-io ./test/bench-io
exec bin/bench-io "$@"
