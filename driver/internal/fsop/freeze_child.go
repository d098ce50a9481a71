package fsop

import (
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// _IOWR('X', 119, int) and _IOWR('X', 120, int) from include/uapi/linux/fs.h;
// x/sys/unix does not define them.
const (
	ioctlFIFREEZE = 0xC0045877
	ioctlFITHAW   = 0xC0045878
)

// Freeze states the child reports first.
const (
	// StateFrozen: frozen by this child and the loop device flushed.
	StateFrozen = "frozen"
	// StateBusy: already frozen by someone else; the loop device is
	// flushed and the thaw is theirs.
	StateBusy = "busy"
	// StateSynced: the filesystem cannot freeze; it was synced (syncfs)
	// and the loop device flushed.
	StateSynced = "synced"
	// stateExpired: the window ended first; nothing of this child is left
	// frozen once it exits.
	stateExpired = "expired"
	// stateThawed: thawed on the driver's request, within the window.
	stateThawed = "thawed"
)

// freezeChild freezes req.Path, which must be the filesystem on req.Device,
// flushes req.Device and holds the freeze until the driver writes "thaw",
// closes standard input, or req.Window (counted from the child's start)
// ends. It always thaws what it froze, however late the freeze completes.
func freezeChild(req request, in <-chan string, out *replier) int {
	ctl := watch(in, req.Window)
	fd, err := openOnDevice(req.Path, req.Device)
	if err != nil {
		out.send(replyOf("", "", err))
		return 0
	}
	froze := make(chan error, 1)
	go func() { froze <- unix.IoctlSetInt(fd, ioctlFIFREEZE, 0) }()
	select {
	case err = <-froze:
	case <-ctl.expired:
		out.send(replyOf(stateExpired, "", fmt.Errorf("freeze %s: %w", req.Path, ErrExpired)))
		return thawLate(fd, froze)
	case <-ctl.eof:
		return thawLate(fd, froze)
	}
	switch {
	case errors.Is(err, unix.EBUSY):
		return flushReport(req, StateBusy, ctl, out)
	case errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTTY):
		if err := ctl.bounded(func() error { return syncFS(req.Path) }); err != nil {
			out.send(replyOf("", "", err))
			return 0
		}
		return flushReport(req, StateSynced, ctl, out)
	case err != nil:
		out.send(replyOf("", "", fmt.Errorf("freeze %s: %w", req.Path, err)))
		return 0
	}
	// Frozen: from here on every path thaws.
	if err := ctl.bounded(func() error { return flushLoop(req.Device) }); err != nil {
		terr := thaw(fd)
		out.send(replyOf("", "", errors.Join(fmt.Errorf("flush %s: %w", req.Device, err), terr)))
		return exitCode(terr)
	}
	out.send(replyOf(StateFrozen, "", nil))
	select {
	case <-ctl.thaw:
		err := thaw(fd)
		out.send(replyOf(stateThawed, "", err))
		return exitCode(err)
	case <-ctl.eof:
		return exitCode(thaw(fd))
	case <-ctl.expired:
		err := thaw(fd)
		out.send(replyOf(stateExpired, "", errors.Join(fmt.Errorf("hold %s: %w", req.Path, ErrExpired), err)))
		return exitCode(err)
	}
}

// control is what ends a freeze child's wait: the driver's "thaw", the end
// of standard input (the driver gave up, or died), the end of the window.
type control struct {
	thaw, eof, expired chan struct{}
}

func watch(in <-chan string, window time.Duration) control {
	c := control{thaw: make(chan struct{}), eof: make(chan struct{}), expired: make(chan struct{})}
	time.AfterFunc(window, func() { close(c.expired) })
	go func() {
		asked := false
		for line := range in {
			if line == "thaw" && !asked {
				asked = true
				close(c.thaw)
			}
		}
		close(c.eof)
	}()
	return c
}

// bounded runs f until it returns, the window ends or standard input ends;
// f keeps running in the background then (the child exits soon).
func (c control) bounded(f func() error) error {
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return err
	case <-c.expired:
		return ErrExpired
	case <-c.eof:
		return errors.New("the driver gave up")
	}
}

// flushReport flushes the loop device of a filesystem this child did not
// freeze and reports state.
func flushReport(req request, state string, ctl control, out *replier) int {
	if err := ctl.bounded(func() error { return flushLoop(req.Device) }); err != nil {
		out.send(replyOf("", "", fmt.Errorf("flush %s: %w", req.Device, err)))
		return 0
	}
	out.send(replyOf(state, "", nil))
	return 0
}

// thawLate waits for a freeze that is still in the kernel and thaws it if
// it succeeded.
func thawLate(fd int, froze <-chan error) int {
	if err := <-froze; err != nil {
		return 0 // never frozen by us
	}
	return exitCode(thaw(fd))
}

func thaw(fd int) error {
	if err := unix.IoctlSetInt(fd, ioctlFITHAW, 0); err != nil {
		return fmt.Errorf("thaw: %w", err)
	}
	return nil
}

func exitCode(thawErr error) int {
	if thawErr != nil {
		return 1
	}
	return 0
}

// openOnDevice opens the directory path and checks that it is on the block
// device dev: a staging path whose mount is missing is a directory of the
// node's own filesystem, which must never be frozen.
func openOnDevice(path, dev string) (int, error) {
	var bst unix.Stat_t
	if err := unix.Stat(dev, &bst); err != nil {
		return -1, fmt.Errorf("stat %s: %w", dev, err)
	}
	if bst.Mode&unix.S_IFMT != unix.S_IFBLK {
		return -1, fmt.Errorf("%s is not a block device: %w", dev, unix.ENOTBLK)
	}
	return openOnDev(path, bst.Rdev)
}

// openOnDev opens the directory path if it is on the device numbered rdev.
func openOnDev(path string, rdev uint64) (int, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("stat %s: %w", path, err)
	}
	if st.Dev != rdev {
		unix.Close(fd)
		return -1, fmt.Errorf("%s is on device %d:%d, not on %d:%d: %w",
			path, unix.Major(st.Dev), unix.Minor(st.Dev), unix.Major(rdev), unix.Minor(rdev), ErrNotMounted)
	}
	return fd, nil
}

// thawRecorded thaws a freeze recorded before a crash: the first of
// req.Paths that is on device req.Dev. A filesystem that is not frozen
// (EINVAL) is fine; no path on the device means there is nothing left to
// reach, and nothing to do.
func thawRecorded(req request) (string, error) {
	for _, p := range req.Paths {
		fd, err := openOnDev(p, req.Dev)
		if err != nil {
			continue
		}
		err = thaw(fd)
		unix.Close(fd)
		switch {
		case err == nil:
			return "thawed " + p, nil
		case errors.Is(err, unix.EINVAL):
			return "not frozen", nil
		default:
			return "", fmt.Errorf("thaw %s: %w", p, err)
		}
	}
	return "not mounted", nil
}
