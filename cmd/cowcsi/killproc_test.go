package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// What the kill test reads from /proc and /sys, and the short-lived child
// that probes a filesystem for a freeze: all of it scoped to the
// processes and mounts the test made (other tests run on the machine).

// procTree returns roots and all their living descendants.
func procTree(roots ...int) []int {
	parent := map[int]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, err := readStat(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			parent[pid] = st.ppid
		}
	}
	var out []int
	for _, r := range roots {
		if _, alive := parent[r]; alive {
			out = append(out, r)
		}
	}
	for i := 0; i < len(out); i++ {
		for pid, pp := range parent {
			if pp == out[i] && !slices.Contains(out, pid) {
				out = append(out, pid)
			}
		}
	}
	return out
}

type procStat struct {
	comm  string
	state byte
	ppid  int
	start uint64 // start time in clock ticks since boot: tells a reused pid
}

// readStat parses a /proc/.../stat line; the command name may hold
// spaces and parentheses, so the fields are taken after its last ')'.
func readStat(path string) (procStat, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return procStat{}, err
	}
	s := string(b)
	open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || end < open {
		return procStat{}, fmt.Errorf("%s: unexpected %q", path, s)
	}
	f := strings.Fields(s[end+1:])
	if len(f) < 20 {
		return procStat{}, fmt.Errorf("%s: unexpected %q", path, s)
	}
	ppid, _ := strconv.Atoi(f[1])
	start, _ := strconv.ParseUint(f[19], 10, 64)
	return procStat{comm: s[open+1 : end], state: f[0][0], ppid: ppid, start: start}, nil
}

// threadsInD lists "pid/tid" of the threads of pids in state D.
func threadsInD(pids []int) []string {
	var out []string
	for _, pid := range pids {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
		for _, p := range tasks {
			if st, err := readStat(p); err == nil && st.state == 'D' {
				out = append(out, fmt.Sprintf("%d/%s", pid, filepath.Base(filepath.Dir(p))))
			}
		}
	}
	return out
}

// started lists the processes below this one: everything the test
// started, and (this process being a subreaper) the orphans of the
// drivers it killed.
func started() []int { return procTree(os.Getpid())[1:] }

// stuckInD samples the threads of started(), but for the processes in
// old (an earlier trial's, reported there), for about a second and
// returns those in state D in every sample, with their kernel stacks. A
// thread in D for a moment is normal I/O; in D all along while nothing is
// asked of it, it waits for something that never comes.
func stuckInD(old []int) string {
	ours := func() []int {
		return slices.DeleteFunc(started(), func(pid int) bool { return slices.Contains(old, pid) })
	}
	stuck := threadsInD(ours())
	for i := 0; i < 5 && len(stuck) > 0; i++ {
		time.Sleep(200 * time.Millisecond) // sampling interval
		now := threadsInD(ours())
		stuck = slices.DeleteFunc(stuck, func(s string) bool { return !slices.Contains(now, s) })
	}
	var b strings.Builder
	for _, pt := range stuck {
		pid, tid, _ := strings.Cut(pt, "/")
		b.WriteString(describeTask(fmt.Sprintf("/proc/%s/task/%s", pid, tid)))
	}
	return b.String()
}

// managed are the children an exec.Cmd waits for: killOrphans must not
// reap them.
var managed sync.Map // pid -> struct{}

func manage(pid int)   { managed.Store(pid, struct{}{}) }
func unmanage(pid int) { managed.Delete(pid) }

// killOrphans kills and reaps the orphans of killed drivers that came to
// this process.
func killOrphans(t *testing.T) {
	self := os.Getpid()
	for _, pid := range started() {
		st, err := readStat(fmt.Sprintf("/proc/%d/stat", pid))
		if _, ok := managed.Load(pid); ok || err != nil || st.ppid != self {
			continue
		}
		if st.state != 'Z' {
			t.Logf("cleanup: killing pid %d (%s), orphaned by a killed driver", pid, st.comm)
			unix.Kill(pid, unix.SIGKILL)
		}
		var ws unix.WaitStatus
		unix.Wait4(pid, &ws, unix.WNOHANG, nil)
	}
}

// describeTask is a thread's command, state, wchan and kernel stack.
func describeTask(dir string) string {
	st, _ := readStat(filepath.Join(dir, "stat"))
	wchan, _ := os.ReadFile(filepath.Join(dir, "wchan"))
	stack, _ := os.ReadFile(filepath.Join(dir, "stack"))
	return fmt.Sprintf("%s (%s) state %c wchan %s\n%s", dir, st.comm, st.state, wchan, indent(string(stack)))
}

// dumpProc describes every thread of pid.
func dumpProc(pid int) string {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", pid))
	if len(tasks) == 0 {
		return fmt.Sprintf("pid %d: no threads left in /proc\n", pid)
	}
	var b strings.Builder
	for _, d := range tasks {
		b.WriteString(describeTask(d))
	}
	return b.String()
}

func indent(s string) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return ""
	}
	return "    " + strings.ReplaceAll(s, "\n", "\n    ") + "\n"
}

// fuseConnsUnder returns the FUSE connection numbers (device minors) of
// the cowcsi FUSE mounts at or below root.
func fuseConnsUnder(root string) []int {
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(root))
	if err != nil {
		return nil
	}
	var out []int
	for _, m := range ms {
		if m.FSType == "fuse.cowcsi" && !slices.Contains(out, m.Minor) {
			out = append(out, m.Minor)
		}
	}
	return out
}

// connWaiting returns the number of requests waiting on FUSE connection
// n, and false if the connection is gone.
func connWaiting(n int) (int, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/sys/fs/fuse/connections/%d/waiting", n))
	if err != nil {
		return 0, false
	}
	w, err := strconv.Atoi(strings.TrimSpace(string(b)))
	return w, err == nil
}

// foreignConn reports whether connection number n is now the one of a
// mount outside root: ours went away and the number was reused.
func foreignConn(n int, root string) bool {
	ms, _ := mountinfo.GetMounts(func(m *mountinfo.Info) (bool, bool) {
		return !strings.HasPrefix(m.FSType, "fuse") || m.Minor != n, false
	})
	for _, m := range ms {
		if m.Mountpoint != root && !strings.HasPrefix(m.Mountpoint, root+"/") {
			return true
		}
	}
	return false
}

// stuckConn: connection n (once a mount below root) of a killed driver
// still exists and holds requests. Once its server is gone the kernel
// ends every request; one that stays is held by a teardown that does not
// complete (a FUSE io_uring entry that keeps its request).
func stuckConn(n int, root string) (int, bool) {
	w, ok := connWaiting(n)
	return w, ok && w > 0 && !foreignConn(n, root)
}

// abortFuseUnder aborts the FUSE connections of the mounts below root
// (only those: other tests' connections live elsewhere) and returns them.
func abortFuseUnder(root string) []int {
	conns := fuseConnsUnder(root)
	for _, c := range conns {
		os.WriteFile(fmt.Sprintf("/sys/fs/fuse/connections/%d/abort", c), []byte("1"), 0o200)
	}
	return conns
}

// Freeze probing runs in a child process: FIFREEZE syncs the filesystem,
// which goes through the driver's FUSE file, and a test thread stuck there
// could not be stopped. The child's answer is one word on stdout.
const (
	envProbe      = "COWCSI_KILL_PROBE"
	ioctlFIFREEZE = 0xC0045877
	ioctlFITHAW   = 0xC0045878
)

// probeMain: args mode ("freeze" or "thaw") and the path of a mount root.
// freeze answers "frozen" if the filesystem was frozen already (EBUSY),
// else "ok" after freezing and thawing it; thaw answers "thawed" or
// "notfrozen".
func probeMain(args []string) int {
	if len(args) != 2 {
		return 2
	}
	fd, err := unix.Open(args[1], unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		fmt.Printf("error open: %v\n", err)
		return 0
	}
	switch args[0] {
	case "freeze":
		err := unix.IoctlSetInt(fd, ioctlFIFREEZE, 0)
		switch {
		case errors.Is(err, unix.EBUSY):
			fmt.Println("frozen")
		case err != nil:
			fmt.Printf("error freeze: %v\n", err)
		case unix.IoctlSetInt(fd, ioctlFITHAW, 0) != nil:
			fmt.Println("error thaw after probe")
		default:
			fmt.Println("ok")
		}
	case "thaw":
		if err := unix.IoctlSetInt(fd, ioctlFITHAW, 0); err != nil {
			fmt.Println("notfrozen")
		} else {
			fmt.Println("thawed")
		}
	}
	return 0
}

// noRaceExitSleep keeps a child built with the race detector (this test
// binary under go test -race) from sleeping a second before it exits.
const noRaceExitSleep = "GORACE=atexit_sleep_ms=0"

// runProbe runs the probe child on path, bounded: a child that does not
// answer in time is reported with its kernel stacks, then killed.
func runProbe(mode, path string) (string, error) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], mode, path)
	cmd.Env = append(os.Environ(), envProbe+"=1", noRaceExitSleep)
	var out strings.Builder
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		return "", err
	}
	manage(cmd.Process.Pid)
	done := make(chan error, 1)
	go func() {
		done <- cmd.Wait()
		unmanage(cmd.Process.Pid)
	}()
	select {
	case err := <-done:
		return strings.TrimSpace(out.String()), err
	case <-time.After(exitBound):
		dump := dumpProc(cmd.Process.Pid)
		cancel()
		return "", fmt.Errorf("%s probe of %s did not return within %v:\n%s", mode, path, exitBound, dump)
	}
}
