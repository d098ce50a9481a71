package driver

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// One driver per store and per socket. A second instance (a container
// restart while the old process still exits, a DaemonSet surge, two
// deployments) must fail before it touches anything the running one owns:
// the socket, the node state, the FUSE mount point and the loop devices.

// errAnotherInstance marks a start refused because another process runs
// on the same store or serves the same socket.
var errAnotherInstance = errors.New("another cowcsi instance is running")

// instanceLockName is the file in the store directory that a running
// driver holds an exclusive flock on for its whole life. It also records
// the holder's pid, for the error message of the next one.
const instanceLockName = "instance.lock"

// lockInstance takes the store directory's instance lock, without waiting.
// The lock lasts until the returned file is closed or the process ends
// (the kernel drops it even on SIGKILL).
func lockInstance(storeDir string) (*os.File, error) {
	path := filepath.Join(storeDir, instanceLockName)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("instance lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if !errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("instance lock %s: %w", path, err)
		}
		holder := "another process"
		if pid := lockHolder(storeDir); pid > 0 {
			holder = fmt.Sprintf("pid %d", pid)
		}
		return nil, fmt.Errorf("%w on store %s: %s holds %s", errAnotherInstance, storeDir, holder, path)
	}
	// Informative only: a failure to record the pid costs nothing but
	// the pid in the message above.
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(fmt.Sprintf("%d\n", os.Getpid())), 0)
	}
	return f, nil
}

// removeStaleSocket makes way for a new socket at path. Only a socket that
// refuses connections is stale (its listener is gone) and is removed; one
// that accepts them is another process's, whose clients would be cut off.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("endpoint %s exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unix", path, 2*time.Second)
	switch {
	case err == nil:
		c.Close()
		return fmt.Errorf("%w on endpoint %s: the socket accepts connections", errAnotherInstance, path)
	case errors.Is(err, fs.ErrNotExist):
		return nil // removed meanwhile
	case !errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("endpoint %s: cannot tell whether the socket is stale: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	klog.InfoS("Removed stale socket", "path", path)
	return nil
}
