#!/usr/bin/env bash
# make bench-io: installs fio (and mkfs.ext4) if missing, builds
# test/bench-io and runs it. Arguments go to the program (see -help); the
# Makefile passes BENCH_IO_FLAGS. Needs root.
set -euo pipefail

# shellcheck source=test/bench-io/deps.sh
source "$(dirname "$0")/deps.sh"

cd "$(dirname "$0")/../.."
mkdir -p bin
go build -o bin/bench-io ./test/bench-io
exec bin/bench-io "$@"
