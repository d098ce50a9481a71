#!/usr/bin/env bash
# Keeps a test run from hanging forever on a dead FUSE connection.
#
#   test/fuse-guard.sh cleanup              abort and detach every cowcsi FUSE
#                                           mount left on this machine
#   test/fuse-guard.sh run MINUTES CMD...   run CMD; if it is still running
#                                           after MINUTES, print what is stuck,
#                                           abort the cowcsi FUSE connections
#                                           made since the start (not those of
#                                           a driver serving this node), stop
#                                           CMD and exit 124
#
# Why: the tests serve FUSE from their own processes. A request that a
# process's own server never answers leaves a thread in an uninterruptible
# wait (request_wait_answer), and then neither go test's -timeout (a timer
# in the stuck process) nor SIGKILL ends it: the process stays until the
# connection is aborted through fusectl. Anything that stats mount points
# (mkfs, df) hangs on such a mount too, so leftovers are cleared first.
set -euo pipefail

fusectl=/sys/fs/fuse/connections

# cowcsi_mounts prints "connection mountpoint" for every cowcsi FUSE mount
# (fstype fuse.cowcsi; the connection number is the device minor).
cowcsi_mounts() {
	awk '{ for (i = 7; i <= NF; i++) if ($i == "-") break;
	       if ($(i+1) == "fuse.cowcsi") { split($3, d, ":"); print d[2], $5 } }' /proc/self/mountinfo
}

ensure_fusectl() {
	[ -d "$fusectl" ] || return 0
	mountpoint -q "$fusectl" || mount -t fusectl none "$fusectl" 2>/dev/null || true
}

# report prints, for each cowcsi connection with requests waiting, the
# count and the kernel stacks of threads waiting on a FUSE answer.
report() {
	ensure_fusectl
	cowcsi_mounts | while read -r conn dir; do
		w=$(cat "$fusectl/$conn/waiting" 2>/dev/null || echo "?")
		echo "fuse-guard: connection $conn at $dir: $w request(s) waiting"
	done
	for st in /proc/[0-9]*/task/[0-9]*/stack; do
		if grep -q -e request_wait_answer -e fuse_ "$st" 2>/dev/null; then
			t=${st%/stack}
			echo "fuse-guard: thread ${t#/proc/} ($(cat "$t/comm" 2>/dev/null)):"
			sed 's/^/    /' "$st" 2>/dev/null | head -12
		fi
	done
}

# abort_all aborts and detaches every cowcsi FUSE mount but those whose
# connection number is listed in the file $1 (if given).
abort_all() {
	local keep=${1:-/dev/null}
	ensure_fusectl
	cowcsi_mounts | while read -r conn dir; do
		grep -qx "$conn" "$keep" && continue
		if [ -e "$fusectl/$conn/abort" ]; then
			echo 1 >"$fusectl/$conn/abort" 2>/dev/null || true
		fi
		# Decode mountinfo's octal escapes (\040 for a space).
		umount -l "$(printf '%b' "$dir")" 2>/dev/null || true
	done
}

case "${1:-}" in
cleanup)
	n=$(cowcsi_mounts | wc -l)
	if [ "$n" -gt 0 ]; then
		echo "fuse-guard: $n stale cowcsi FUSE mount(s); aborting and detaching them"
		report
		abort_all
	fi
	;;
run)
	minutes=$2
	shift 2
	before=$(mktemp)
	cowcsi_mounts | cut -d' ' -f1 >"$before"
	trap 'rm -f "$before"' EXIT
	# CMD in its own process group, so that all of it can be stopped.
	setsid "$@" &
	pid=$!
	(
		# The sleep must not outlive the run: it holds the output open.
		trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
		sleep $((minutes * 60)) &
		sleeper=$!
		wait "$sleeper"
		if kill -0 "$pid" 2>/dev/null; then
			echo "fuse-guard: '$*' still running after $minutes minutes: stopping it" >&2
			report >&2
			kill -QUIT -- -"$pid" 2>/dev/null || true # goroutine dumps where a process can still print
			sleep 20
			abort_all "$before"
			sleep 5
			kill -KILL -- -"$pid" 2>/dev/null || true
			touch "/tmp/fuse-guard.$pid.expired"
		fi
	) &
	watchdog=$!
	rc=0
	wait "$pid" || rc=$?
	kill "$watchdog" 2>/dev/null || true
	wait "$watchdog" 2>/dev/null || true
	if [ -e "/tmp/fuse-guard.$pid.expired" ]; then
		rm -f "/tmp/fuse-guard.$pid.expired"
		exit 124
	fi
	exit "$rc"
	;;
*)
	echo "usage: $0 cleanup | run MINUTES CMD..." >&2
	exit 2
	;;
esac
