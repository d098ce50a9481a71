package driver

import (
	"context"
	"errors"
	"io/fs"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/cowcsi/cowcsi/cow"
	"github.com/cowcsi/cowcsi/cow/loopdev"
)

// loopDevices implements LoopDevices with cow/loopdev.
type loopDevices struct{}

var _ LoopDevices = loopDevices{}

func (loopDevices) Attach(ctx context.Context, backing string, readOnly bool) (string, error) {
	d, err := loopdev.Attach(ctx, backing, loopdev.Options{
		ReadOnly:         readOnly,
		DirectIO:         true,
		LogicalBlockSize: cow.BlockSize,
		// No autoclear: a block volume's device is opened and closed by
		// its users, and the last close must not detach it. Detach is
		// explicit in NodeUnstageVolume.
		Autoclear: false,
	})
	if err != nil {
		return "", err
	}
	return d.Path, nil
}

func (loopDevices) Detach(ctx context.Context, dev, backing string) error {
	d, err := loopdev.Open(dev)
	if err != nil {
		if gone(err) {
			return nil
		}
		// loopdev asks the kernel for the loop status, which stats the
		// backing file; on a dead FUSE connection (a crashed driver)
		// that fails with ENOTCONN. The device is exactly what must be
		// detached then: do it with sysfs and the bare ioctl.
		return clearStale(dev, backing)
	}
	if backing != "" && d.BackingFile != "" && !sameBacking(d.BackingFile, backing) {
		return nil // the number was reused: not ours any more
	}
	err = d.Detach()
	if errors.Is(err, loopdev.ErrBusy) {
		// The kernel detaches on last close (e.g. a lazily unmounted
		// filesystem still in use); nothing more we can do.
		klog.InfoS("Loop device still open; the kernel detaches it on last close", "device", dev)
		return nil
	}
	return err
}

func (loopDevices) Resize(ctx context.Context, dev string) error {
	d, err := loopdev.Open(dev)
	if err != nil {
		return err
	}
	return d.Resize()
}

func (loopDevices) Sync(ctx context.Context, dev string) error {
	d, err := loopdev.Open(dev)
	if err != nil {
		return err
	}
	return d.Sync()
}

func (loopDevices) BackingFile(dev string) (string, error) {
	d, err := loopdev.Open(dev)
	if err != nil {
		if gone(err) {
			return "", err
		}
		return loopdev.BackingFileOf(dev) // stale FUSE file: see Detach
	}
	return cleanBacking(d.BackingFile), nil
}

// FindByBacking reads sysfs only and matches by name: the stale devices a
// restarted driver looks for have backing files on a dead FUSE mount, which
// the kernel may name "path (deleted)" (TestLoopdevWithDeadFUSEServer).
func (loopDevices) FindByBacking(backing string) ([]string, error) {
	return findBySysfs(backing)
}

func gone(err error) bool {
	return errors.Is(err, unix.ENXIO) || errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENODEV)
}

// The helpers below read only sysfs (through loopdev's Bindings,
// BackingFileOf and ClearFD), never the backing file, so they work for loop
// devices whose FUSE file's server is gone, and sameBacking also matches the
// bare name the kernel reports once the FUSE mount above the file was
// lazily detached (loopdev.Device compares exact paths).

// cleanBacking undoes what d_path adds to the name of a file whose dentry
// was invalidated: on a dead FUSE connection the kernel reports
// "/path/vol-x (deleted)".
func cleanBacking(p string) string {
	return strings.TrimSuffix(strings.TrimSpace(p), " (deleted)")
}

// sameBacking reports whether the kernel's name cur for a loop device's
// backing file denotes want: the same path, or the bare file name when
// the (FUSE) mount above it has been detached.
func sameBacking(cur, want string) bool {
	cur = cleanBacking(cur)
	return cur == want || cur == "/"+filepath.Base(want)
}

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

// clearStale detaches dev (loopdev.ClearFD) if it is still bound to backing,
// or, with backing empty, if it is bound at all (the caller checked).
func clearStale(dev, backing string) error {
	cur, err := loopdev.BackingFileOf(dev)
	if err != nil {
		if gone(err) {
			return nil
		}
		return err
	}
	if backing != "" && !sameBacking(cur, backing) {
		return nil // reused by another file: not ours
	}
	if err := loopdev.ClearFD(dev); err != nil && !gone(err) {
		return err
	}
	return nil
}
