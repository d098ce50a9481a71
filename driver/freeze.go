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

// quiesce makes a volume's content in the engine complete up to now, if it
// is staged here: it freezes the staging filesystem (unless freeze is
// false or the volume is a block volume) and flushes the loop device down
// to the engine. The returned release thaws. Not staged here: nothing is
// cached in the kernel, the engine already has everything.
func (n *nodeService) quiesce(ctx context.Context, id string, freeze bool) (release func(), err error) {
	sv := n.get(id)
	if sv == nil {
		return func() {}, nil
	}
	thaw := func() error { return nil }
	if freeze && sv.AccessType == accessMount && !sv.ReadOnly {
		fctx, cancel := context.WithTimeout(ctx, n.d.opts.FreezeTimeout)
		t, err := freezeFS(fctx, sv.StagingPath)
		cancel()
		switch {
		case errors.Is(err, errFreezeUnsupported):
			if err := syncFS(sv.StagingPath); err != nil {
				return nil, err
			}
		case errors.Is(err, unix.EBUSY):
			// Frozen already by someone else (a backup tool, fsfreeze):
			// the filesystem is quiesced on its device, which is all we
			// need; the thaw is theirs.
			klog.InfoS("Filesystem already frozen; snapshotting it as is", "volume", id, "path", sv.StagingPath)
		case err != nil:
			return nil, err
		default:
			thaw = t
		}
	}
	release = func() {
		if err := thaw(); err != nil {
			klog.ErrorS(err, "Thaw failed", "volume", id, "path", sv.StagingPath)
		}
	}
	if err := n.loop().Sync(ctx, sv.LoopDevice); err != nil {
		release()
		return nil, fmt.Errorf("flush loop device %s: %w", sv.LoopDevice, err)
	}
	return release, nil
}
