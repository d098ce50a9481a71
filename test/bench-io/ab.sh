#!/usr/bin/env bash
# make bench-io-ab: the data path's ratios of the working tree against an
# older revision, before a change lands. Builds bench-io from OLD (a git
# worktree, removed after) and from the working tree, runs them one after
# the other PASSES times, alternating which goes first, then compares the
# rows' rounds (bench-io -compare). Exit status 1 if a row's rounds with
# the working tree all lie below its rounds with OLD.
#
#   bash test/bench-io/ab.sh OLD [bench-io flags]
#   env: BENCH_IO_AB_PASSES (default 2), BENCH_IO_AB_DIR (default
#   /var/tmp/cowcsi-bench-io-ab: binaries, JSON and logs)
# Needs root, as bench-io does.
set -euo pipefail

old=${1:?usage: ab.sh OLD-REVISION [bench-io flags]}
shift
passes=${BENCH_IO_AB_PASSES:-2}
out=${BENCH_IO_AB_DIR:-/var/tmp/cowcsi-bench-io-ab}

# shellcheck source=test/bench-io/deps.sh
source "$(dirname "$0")/deps.sh"
cd "$(dirname "$0")/../.."
rev=$(git rev-parse --verify "$old^{commit}")
mkdir -p "$out"
rm -f "$out"/old-*.json "$out"/new-*.json

wt=$(mktemp -d "${TMPDIR:-/tmp}/bench-io-ab.XXXXXX")
trap 'git worktree remove --force "$wt" 2>/dev/null || rm -rf "$wt"' EXIT
git worktree add --quiet --detach "$wt" "$rev"
(cd "$wt" && go build -o "$out/bench-io-old" ./test/bench-io)
git worktree remove --force "$wt"
trap - EXIT
go build -o "$out/bench-io-new" ./test/bench-io
echo "bench-io-ab: old $rev, new the working tree ($(git describe --always --dirty)), $passes passes"

olds=() news=()
for ((p = 1; p <= passes; p++)); do
	order=(old new)
	((p % 2 == 0)) && order=(new old)
	for side in "${order[@]}"; do
		echo "bench-io-ab: pass $p/$passes, $side ($(date +%T))"
		"$out/bench-io-$side" -out "$out/$side-$p.json" "$@" >"$out/$side-$p.log" 2>&1 || {
			echo "bench-io-ab: the $side run failed; its log:" >&2
			tail -20 "$out/$side-$p.log" >&2
			exit 2
		}
		if [ "$side" = old ]; then olds+=("$out/$side-$p.json"); else news+=("$out/$side-$p.json"); fi
	done
done
join() { local IFS=,; echo "$*"; }
"$out/bench-io-new" -compare "$(join "${olds[@]}")" "$(join "${news[@]}")"
