package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"github.com/cowcsi/cowcsi/cow/fusefs"
)

// A previous instance can be stuck on its way out: a thread of it waits in
// the kernel for an answer from its own FUSE connection (a request its dead
// server threads had already read), so the process never finishes exiting,
// never releases /dev/fuse, and the kernel never aborts the connection.
// It still holds the instance lock, so every restart would fail. Aborting
// the connection through fusectl ends that wait and lets the process go.
//
// Only a connection nobody serves is aborted: either the instance lock is
// free (its server is gone), or its holder is a process that was killed
// and is exiting. A live instance keeps its lock and its connection.

// takeoverWait bounds how long a start waits for a stuck previous instance
// to exit once its connection was aborted.
var takeoverWait = 30 * time.Second

// takeInstance takes the store's instance lock (lockInstance). When the
// holder is a previous instance stuck exiting, it aborts the FUSE
// connections at fuseDir and waits for the lock. With the lock taken,
// connections still mounted at fuseDir are stale and are aborted too.
func takeInstance(ctx context.Context, storeDir, fuseDir string) (*os.File, error) {
	lock, err := lockInstance(storeDir)
	if errors.Is(err, errAnotherInstance) {
		pid := lockHolder(storeDir)
		if pid <= 0 || !exiting(pid) {
			return nil, err
		}
		klog.InfoS("Previous instance is stuck exiting; aborting its FUSE connection", "pid", pid, "dir", fuseDir)
		abortStaleConnections(fuseDir)
		lock, err = waitForLock(ctx, storeDir, pid)
	}
	if err != nil {
		return nil, err
	}
	abortStaleConnections(fuseDir)
	return lock, nil
}

// waitForLock polls the instance lock until the stuck holder pid is gone.
func waitForLock(ctx context.Context, storeDir string, pid int) (*os.File, error) {
	ctx, cancel := context.WithTimeout(ctx, takeoverWait)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		lock, err := lockInstance(storeDir)
		if !errors.Is(err, errAnotherInstance) {
			return lock, err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w; pid %d did not exit after its FUSE connection was aborted (threads: %s)",
				err, pid, strings.Join(taskStates(pid), " "))
		case <-tick.C:
		}
	}
}

// abortStaleConnections aborts every fuse.cowcsi connection mounted at
// dir. The caller holds the instance lock, so no live server owns them.
// Failures are logged: mounting over the stale mount (fusefs.Mount) then
// reports what is wrong.
func abortStaleConnections(dir string) {
	conns, err := fusefs.Connections(dir)
	if err != nil {
		klog.ErrorS(err, "Looking for stale FUSE connections", "dir", dir)
		return
	}
	for _, c := range conns {
		if err := fusefs.AbortConnection(c); err != nil {
			klog.ErrorS(err, "Aborting a stale FUSE connection", "dir", dir, "connection", c)
			continue
		}
		klog.InfoS("Aborted the FUSE connection a previous instance left", "dir", dir, "connection", c)
	}
}

// lockHolder is the pid recorded in the instance lock file, or 0.
func lockHolder(storeDir string) int {
	b, err := os.ReadFile(filepath.Join(storeDir, instanceLockName))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0
	}
	return pid
}

// pfExiting is PF_EXITING from include/linux/sched.h: the task is in
// do_exit.
const pfExiting = 0x4

// sigkillMask is SIGKILL's bit in /proc/<pid>/status signal masks.
const sigkillMask = 1 << (9 - 1)

// exiting reports whether process pid is on its way out: its leader is a
// zombie, or one of its threads is exiting or has a SIGKILL pending (a
// thread in an uninterruptible wait does not act on it).
func exiting(pid int) bool {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return false
	}
	for _, t := range tasks {
		dir := fmt.Sprintf("/proc/%d/task/%s", pid, t.Name())
		state, flags, ok := taskStat(dir)
		if !ok {
			continue
		}
		if state == "Z" || state == "X" || flags&pfExiting != 0 || sigkillPending(dir) {
			return true
		}
	}
	return false
}

// taskStat reads a task's state and flags from its stat file (fields 3
// and 9; the command name in field 2 may hold spaces and parentheses).
func taskStat(dir string) (state string, flags uint64, ok bool) {
	b, err := os.ReadFile(dir + "/stat")
	if err != nil {
		return "", 0, false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return "", 0, false
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 7 {
		return "", 0, false
	}
	flags, err = strconv.ParseUint(f[6], 10, 64)
	if err != nil {
		return "", 0, false
	}
	return f[0], flags, true
}

func sigkillPending(dir string) bool {
	b, err := os.ReadFile(dir + "/status")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || (k != "SigPnd" && k != "ShdPnd") {
			continue
		}
		m, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		if err == nil && m&sigkillMask != 0 {
			return true
		}
	}
	return false
}

// taskStates lists "tid:state:wchan" for the threads of pid, for an error
// message about a process that does not exit.
func taskStates(pid int) []string {
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	var out []string
	for _, t := range tasks {
		dir := fmt.Sprintf("/proc/%d/task/%s", pid, t.Name())
		state, _, _ := taskStat(dir)
		wchan, _ := os.ReadFile(dir + "/wchan")
		out = append(out, t.Name()+":"+state+":"+string(wchan))
	}
	return out
}
