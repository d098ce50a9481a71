package driver

import (
	"context"

	"k8s.io/klog/v2"

	"github.com/cowcsi/cowcsi/cow/loopdev"
	"github.com/cowcsi/cowcsi/driver/internal/fsop"
)

// loopDevices implements LoopDevices with cow/loopdev. Every call that
// touches the backing FUSE file (opening it, LOOP_CONFIGURE, the loop
// status, which stats it, LOOP_CLR_FD, which waits for in-flight I/O, and
// fsync) runs in a child process (package fsop); what reads only sysfs runs
// here.
type loopDevices struct{}

var _ LoopDevices = loopDevices{}

func (loopDevices) Attach(ctx context.Context, backing string, readOnly bool) (string, error) {
	return fsop.Attach(ctx, backing, readOnly)
}

func (loopDevices) Detach(ctx context.Context, dev, backing string) error {
	deferred, err := fsop.Detach(ctx, dev, backing)
	if deferred {
		klog.InfoS("Loop device still open; the kernel detaches it on last close", "device", dev)
	}
	return err
}

func (loopDevices) Resize(ctx context.Context, dev string) error {
	return fsop.Resize(ctx, dev)
}

func (loopDevices) Sync(ctx context.Context, dev string) error {
	return fsop.Flush(ctx, dev)
}

// BackingFile reads sysfs only: the loop status would stat the FUSE file.
func (loopDevices) BackingFile(dev string) (string, error) {
	b, err := loopdev.BackingFileOf(dev)
	if err != nil {
		return "", err
	}
	return cleanBacking(b), nil
}

// FindByBacking reads sysfs only and matches by name: the stale devices a
// restarted driver looks for have backing files on a dead FUSE mount, which
// the kernel may name "path (deleted)" (TestLoopdevWithDeadFUSEServer).
func (loopDevices) FindByBacking(backing string) ([]string, error) {
	return findBySysfs(backing)
}

// The helpers below read only sysfs (through loopdev's Bindings,
// BackingFileOf and ClearFD), never the backing file, so they work for loop
// devices whose FUSE file's server is gone, and sameBacking also matches the
// bare name the kernel reports once the FUSE mount above the file was
// lazily detached (loopdev.Device compares exact paths).

// cleanBacking undoes what d_path adds to the name of a file whose dentry
// was invalidated ("/path/vol-x (deleted)").
func cleanBacking(p string) string { return fsop.CleanBacking(p) }

// sameBacking reports whether the kernel's name cur for a loop device's
// backing file denotes want.
func sameBacking(cur, want string) bool { return fsop.SameBacking(cur, want) }

func findBySysfs(backing string) ([]string, error) {
	bound, err := loopdev.Bindings()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, b := range bound {
		if b.BackingFile == backing {
			out = append(out, b.Path)
		}
	}
	return out, nil
}

// clearStale detaches dev if it is still bound to backing, or, with backing
// empty, if it is bound at all.
func clearStale(dev, backing string) error { return fsop.ClearStale(dev, backing) }
