package fsop

import (
	"errors"
	"io/fs"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/loopdev"
)

// detach unbinds dev if it is still bound to backing (any file if backing
// is empty). A device that is gone or serves another file is left alone.
// loopdev.Open asks the kernel for the loop status, which stats the backing
// file: on a live connection that is a request to the driver, on a dead one
// it fails (ENOTCONN), and the device is then detached through sysfs and
// the bare ioctl.
func detach(req request) (string, error) {
	dev, backing := req.Device, req.Path
	d, err := loopdev.Open(dev)
	if err != nil {
		if Gone(err) {
			return "", nil
		}
		return "", ClearStale(dev, backing)
	}
	if backing != "" && d.BackingFile != "" && !SameBacking(d.BackingFile, backing) {
		return "", nil // the number was reused: not ours any more
	}
	err = d.Detach()
	if errors.Is(err, loopdev.ErrBusy) {
		// The kernel detaches on last close (e.g. a lazily unmounted
		// filesystem still in use); nothing more to do.
		return detachDeferred, nil
	}
	return "", err
}

// detachDeferred is detach's result for a device still open elsewhere.
const detachDeferred = "deferred"

// Gone reports an error that means the loop device is not there or not
// bound.
func Gone(err error) bool {
	return errors.Is(err, unix.ENXIO) || errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENODEV)
}

// CleanBacking undoes what d_path adds to the name of a file whose dentry
// was invalidated: on a dead FUSE connection the kernel reports
// "/path/vol-x (deleted)".
func CleanBacking(p string) string {
	return strings.TrimSuffix(strings.TrimSpace(p), " (deleted)")
}

// SameBacking reports whether the kernel's name cur for a loop device's
// backing file denotes want: the same path, or the bare file name when
// the (FUSE) mount above it has been detached.
func SameBacking(cur, want string) bool {
	cur = CleanBacking(cur)
	return cur == want || cur == "/"+filepath.Base(want)
}

// ClearStale detaches dev (loopdev.ClearFD) if it is still bound to
// backing, or, with backing empty, if it is bound at all. It reads only
// sysfs, never the backing file.
func ClearStale(dev, backing string) error {
	cur, err := loopdev.BackingFileOf(dev)
	if err != nil {
		if Gone(err) {
			return nil
		}
		return err
	}
	if backing != "" && !SameBacking(cur, backing) {
		return nil // reused by another file: not ours
	}
	if err := loopdev.ClearFD(dev); err != nil && !Gone(err) {
		return err
	}
	return nil
}
