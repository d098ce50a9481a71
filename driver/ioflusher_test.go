package driver

import (
	"errors"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestIOFlusher sets PR_SET_IO_FLUSHER in a child process (it changes every
// thread of the process it runs in) and checks the outcome there: every
// thread, including ones started later, reads back 1 — or, where it cannot
// be set, the reason is the missing CAP_SYS_RESOURCE (EPERM) or a cgo
// build (ENOTSUP), and nothing else.
func TestIOFlusher(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "COWCSI_IOFLUSHER_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v: %s", err, out)
	}
	got := strings.TrimSpace(string(out))
	switch {
	case got == "ok":
	case got == unix.EPERM.Error() && !hasCapSysResource():
		t.Logf("PR_SET_IO_FLUSHER refused without CAP_SYS_RESOURCE, as expected here")
	case got == unix.ENOTSUP.Error():
		t.Logf("PR_SET_IO_FLUSHER not set on all threads in a cgo test binary (ENOTSUP)")
	default:
		t.Fatalf("child reported %q", got)
	}
}

// ioFlusherChild is TestIOFlusher's child: it prints "ok" if every thread
// reads back the flag, else the error.
func ioFlusherChild() int {
	if err := setIOFlusher(); err != nil {
		os.Stdout.WriteString(err.Error() + "\n")
		return 0
	}
	res := make(chan error, 8)
	for range cap(res) {
		go func() {
			runtime.LockOSThread() // a thread of its own, never handed back
			v, err := unix.PrctlRetInt(unix.PR_GET_IO_FLUSHER, 0, 0, 0, 0)
			if err == nil && v != 1 {
				err = errors.New("a thread is not an I/O flusher")
			}
			res <- err
		}()
	}
	for range cap(res) {
		if err := <-res; err != nil {
			os.Stdout.WriteString(err.Error() + "\n")
			return 0
		}
	}
	os.Stdout.WriteString("ok\n")
	return 0
}
