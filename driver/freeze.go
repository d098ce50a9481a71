package driver

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// _IOWR('X', 119, int) and _IOWR('X', 120, int) from include/uapi/linux/fs.h;
// x/sys/unix does not define them.
const (
	ioctlFIFREEZE = 0xC0045877
	ioctlFITHAW   = 0xC0045878
)

// The ioctls, as variables so that a test can make the freeze block.
var (
	ioctlFreeze = func(fd int) error { return unix.IoctlSetInt(fd, ioctlFIFREEZE, 0) }
	ioctlThaw   = func(fd int) error { return unix.IoctlSetInt(fd, ioctlFITHAW, 0) }
)

// errFreezeUnsupported: the filesystem has no freeze_fs (the caller then
// falls back to syncfs).
var errFreezeUnsupported = errors.New("filesystem does not support freezing")

// freezeFS freezes the filesystem mounted at mountPath (FIFREEZE on the
// mount's root directory) and returns the function that thaws it. The
// freeze can block (it waits for writers and syncs the filesystem), so it
// runs in its own goroutine bounded by ctx; if ctx ends first, the freeze
// is abandoned and thawed as soon as it completes, so a late freeze never
// leaves the filesystem frozen.
func freezeFS(ctx context.Context, mountPath string) (thaw func() error, err error) {
	fd, err := unix.Open(mountPath, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s for freezing: %w", mountPath, err)
	}
	done := make(chan error, 1)
	go func() { done <- ioctlFreeze(fd) }()

	// Idempotent: the descriptor is closed exactly once.
	var once sync.Once
	var thawErr error
	thawFD := func() error {
		once.Do(func() {
			defer unix.Close(fd)
			if err := ioctlThaw(fd); err != nil {
				thawErr = fmt.Errorf("thaw %s: %w", mountPath, err)
			}
		})
		return thawErr
	}
	select {
	case err := <-done:
		if err != nil {
			unix.Close(fd)
			if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTTY) {
				return nil, fmt.Errorf("freeze %s: %w", mountPath, errFreezeUnsupported)
			}
			return nil, fmt.Errorf("freeze %s: %w", mountPath, err)
		}
		return thawFD, nil
	case <-ctx.Done():
		go func() {
			if err := <-done; err != nil {
				unix.Close(fd)
				return
			}
			if err := thawFD(); err != nil {
				klog.ErrorS(err, "Thawing a freeze that completed after its timeout", "path", mountPath)
			}
		}()
		return nil, fmt.Errorf("freeze %s: %w", mountPath, ctx.Err())
	}
}

// syncFS flushes the filesystem mounted at mountPath (syncfs(2)).
func syncFS(mountPath string) error {
	fd, err := unix.Open(mountPath, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		return fmt.Errorf("syncfs %s: %w", mountPath, err)
	}
	return nil
}
