package loopdev

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// The functions in this file read sysfs only and never ask the kernel about
// the backing file: they work for loop devices whose backing file sits on a
// dead FUSE mount, where LOOP_GET_STATUS64 fails with ENOTCONN. That is
// exactly the state a restarted driver, or a test cleaning up after a
// crash, has to deal with.

// Binding is a bound loop device as sysfs describes it.
type Binding struct {
	// Path is the device node, /dev/loopN.
	Path string
	// Number is N in /dev/loopN.
	Number int
	// BackingFile is the backing file's path as the kernel names it,
	// without the " (deleted)" suffix it adds for an invalidated dentry.
	BackingFile string
}

// Bindings lists the bound loop devices.
func Bindings() ([]Binding, error) {
	entries, err := os.ReadDir(sysBlock)
	if err != nil {
		return nil, fmt.Errorf("loopdev: %w", err)
	}
	var out []Binding
	for _, e := range entries {
		n, ok := loopNumber(e.Name())
		if !ok {
			continue
		}
		bf, err := backingFileOf(n)
		if err != nil {
			// Unbound devices have no loop/ directory; a device that
			// went away mid-scan is simply not bound.
			continue
		}
		out = append(out, Binding{Path: devPath(n), Number: n, BackingFile: bf})
	}
	return out, nil
}

// BindingsUnder lists the bound loop devices whose backing file is below
// dir.
func BindingsUnder(dir string) ([]Binding, error) {
	all, err := Bindings()
	if err != nil {
		return nil, err
	}
	prefix := filepath.Clean(dir) + "/"
	var out []Binding
	for _, b := range all {
		if strings.HasPrefix(b.BackingFile, prefix) {
			out = append(out, b)
		}
	}
	return out, nil
}

// BackingFileOf returns the backing file of the loop device at dev
// (/dev/loopN) as sysfs names it. It fails wrapping unix.ENXIO when the
// device is not bound.
func BackingFileOf(dev string) (string, error) {
	n, ok := loopNumber(filepath.Base(dev))
	if !ok {
		return "", fmt.Errorf("loopdev: %s is not a loop device: %w", dev, unix.ENODEV)
	}
	bf, err := backingFileOf(n)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("loopdev: %s is not bound: %w", dev, unix.ENXIO)
	}
	if err != nil {
		return "", fmt.Errorf("loopdev: %w", err)
	}
	return bf, nil
}

// ClearFD detaches the loop device at dev with a bare LOOP_CLR_FD, without
// checking what it is bound to (Device.Detach does) and without waiting for
// the kernel to release the backing file. With other openers the kernel
// marks the device autoclear and detaches it on their last close. A device
// that is not bound is not an error.
func ClearFD(dev string) error {
	fd, err := unix.Open(dev, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopdev: open %s: %w", dev, err)
	}
	defer unix.Close(fd)
	if err := unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("loopdev: LOOP_CLR_FD %s: %w", dev, err)
	}
	return nil
}
