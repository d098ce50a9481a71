// Package testutil holds the helpers that tests across cowcsi share: the
// root check, short directories for sockets, and mount cleanup.
//
// It imports nothing from cowcsi, so that every package's tests, internal
// ones included (package cow, package loopdev), can use it without an
// import cycle.
package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// Device nodes tests commonly need, for RequireRoot.
const (
	DevFUSE        = "/dev/fuse"
	DevLoopControl = "/dev/loop-control"
)

// RequireRoot skips t unless the process runs as root and has everything in
// needs, saying what is missing instead of failing obscurely. A need that is
// an absolute path (a device node such as DevFUSE) must exist; any other
// need is a command that must be in PATH.
func RequireRoot(t testing.TB, needs ...string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (mounts, loop devices, FUSE)")
	}
	for _, n := range needs {
		if filepath.IsAbs(n) {
			if _, err := os.Stat(n); err != nil {
				t.Skipf("needs %s: %v", n, err)
			}
		} else if _, err := exec.LookPath(n); err != nil {
			t.Skipf("needs %s in PATH", n)
		}
	}
}

// MountsUnder returns the mount points at or below dir, deepest first.
func MountsUnder(dir string) ([]string, error) {
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(filepath.Clean(dir)))
	if err != nil {
		return nil, err
	}
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.Mountpoint
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out, nil
}

// UnmountAll lazily detaches every mount at or below dir, deepest first,
// logging each, and reports with t.Errorf what is still mounted after a few
// rounds (a mount can appear under one being detached). Lazy, because what
// a failed test leaves may be busy or served by a dead FUSE server.
func UnmountAll(t testing.TB, dir string) {
	t.Helper()
	for range 4 {
		mps, err := MountsUnder(dir)
		if err != nil {
			t.Errorf("cleanup: %v", err)
			return
		}
		if len(mps) == 0 {
			return
		}
		for _, mp := range mps {
			if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
				t.Logf("cleanup: unmount %s: %v", mp, err)
			} else {
				t.Logf("cleanup: detached mount %s", mp)
			}
		}
	}
	if left, _ := MountsUnder(dir); len(left) > 0 {
		t.Errorf("mounts left under %s: %v", dir, strings.Join(left, ", "))
	}
}

// CleanupMounts registers UnmountAll(t, dir) with t.Cleanup. Cleanups run
// last-registered first: call it before starting what mounts under dir, so
// that it runs after that thing's own cleanup.
func CleanupMounts(t testing.TB, dir string) {
	t.Helper()
	t.Cleanup(func() { UnmountAll(t, dir) })
}

// SocketDir returns a new directory for Unix sockets, removed when the test
// ends. Socket paths are limited to 108 bytes and t.TempDir() paths grow
// with the test name, so it lives directly under os.TempDir().
func SocketDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "cowcsi-sock-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
