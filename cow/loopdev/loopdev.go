// Package loopdev attaches, inspects and detaches Linux loop devices with
// ioctls, so the node plugin does not depend on losetup or its output format.
//
// cowcsi exposes a volume to the kernel as a file (served by cow/fusefs) and
// puts a loop device on top of that file; this package is the loop half.
package loopdev

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// ErrBusy is wrapped by Detach when the kernel accepted the detach but the
// device is still open elsewhere (a mounted filesystem, a process holding the
// block device): the kernel then releases the backing file on last close.
var ErrBusy = errors.New("loop device busy")

const (
	controlPath = "/dev/loop-control"
	// loopMajor is LOOP_MAJOR from include/uapi/linux/major.h; used only
	// when sysfs does not tell us the device number.
	loopMajor = 7

	// attachAttempts bounds the LOOP_CTL_GET_FREE/LOOP_CONFIGURE loop:
	// every EBUSY means another process bound the device we were handed,
	// and the next GET_FREE returns a different one.
	attachAttempts = 16
	// busyWait bounds how long Detach retries EBUSY and waits for the
	// kernel to finish tearing the device down.
	busyWait = 2 * time.Second
)

// Options configures Attach.
type Options struct {
	// ReadOnly attaches the device read-only; the backing file is then
	// opened O_RDONLY too.
	ReadOnly bool
	// DirectIO asks the loop driver to access the backing file with direct
	// I/O (no second copy of the data in the page cache). If the backing
	// file cannot do direct I/O at this block size, the device is attached
	// buffered and Device.DirectIO reports false.
	DirectIO bool
	// LogicalBlockSize is the device's logical block size; 0 means 512.
	// cowcsi uses 4096, the engine's block size.
	LogicalBlockSize uint32
	// Autoclear detaches the device automatically when its last opener
	// closes it.
	Autoclear bool
}

// Device is an attached loop device.
type Device struct {
	// Path is the device node, /dev/loopN.
	Path string
	// Number is N in /dev/loopN.
	Number int
	// BackingFile is the absolute path of the backing file as the kernel
	// reports it (may be empty for a device found with Open whose sysfs
	// entry was unreadable).
	BackingFile string
	// ReadOnly reports whether the device is read-only.
	ReadOnly bool

	directIO bool
	// backing identifies the backing file by device and inode number:
	// unlike its path, that survives a lazy unmount of the filesystem
	// holding the file, and it tells our binding from a later reuse of
	// the device number by someone else.
	backing fileID
}

// fileID is a file's identity as LOOP_GET_STATUS64 reports it.
type fileID struct{ dev, ino uint64 }

func idOf(info *unix.LoopInfo64) fileID { return fileID{info.Device, info.Inode} }

// DirectIO reports whether the loop driver accesses the backing file with
// direct I/O. It is false if direct I/O was not requested or if the kernel
// fell back to buffered I/O.
func (d *Device) DirectIO() bool { return d.directIO }

func (d *Device) String() string { return d.Path }

// Attach binds backingFile to a free loop device, configured atomically with
// LOOP_CONFIGURE.
func Attach(ctx context.Context, backingFile string, opts Options) (*Device, error) {
	abs, err := filepath.Abs(backingFile)
	if err != nil {
		return nil, fmt.Errorf("loopdev: %w", err)
	}
	blockSize := opts.LogicalBlockSize
	if blockSize == 0 {
		blockSize = 512
	}
	openFlags := unix.O_RDWR
	if opts.ReadOnly {
		openFlags = unix.O_RDONLY
	}
	// The loop driver takes its own reference on the file during
	// LOOP_CONFIGURE, so both descriptors are closed when Attach returns.
	backing, err := unix.Open(abs, openFlags|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("loopdev: open backing file %s: %w", abs, err)
	}
	defer unix.Close(backing)

	ctl, err := unix.Open(controlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("loopdev: open %s: %w", controlPath, err)
	}
	defer unix.Close(ctl)

	cfg := unix.LoopConfig{Fd: uint32(backing), Size: blockSize}
	cfg.Info.Flags = loFlags(opts)
	// lo_file_name is informational (sysfs backing_file is the real path);
	// it is truncated to the kernel's 64 bytes, NUL-terminated.
	copy(cfg.Info.File_name[:len(cfg.Info.File_name)-1], abs)

	var lastErr error
	for attempt := 0; attempt < attachAttempts; attempt++ {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("loopdev: attach %s: %w", abs, err)
		}
		d, retry, err := configureFree(ctx, ctl, &cfg, abs, openFlags, opts.ReadOnly)
		if retry {
			lastErr = err
			continue
		}
		return d, err
	}
	return nil, fmt.Errorf("loopdev: no free loop device after %d attempts: %w", attachAttempts, lastErr)
}

// configureFree binds cfg's backing file (abs) to the device that
// LOOP_CTL_GET_FREE on ctl hands out. retry reports a lost race (the device
// was removed or bound by another process meanwhile): the caller asks for
// another one.
func configureFree(ctx context.Context, ctl int, cfg *unix.LoopConfig, abs string, openFlags int, readOnly bool) (d *Device, retry bool, err error) {
	n, err := unix.IoctlRetInt(ctl, unix.LOOP_CTL_GET_FREE)
	if err != nil {
		return nil, false, fmt.Errorf("loopdev: LOOP_CTL_GET_FREE: %w", err)
	}
	path, err := ensureNode(ctx, n)
	if err != nil {
		return nil, false, err
	}
	dev, err := unix.Open(path, openFlags|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENOENT) {
			// Removed (LOOP_CTL_REMOVE) between GET_FREE and open.
			return nil, true, err
		}
		return nil, false, fmt.Errorf("loopdev: open %s: %w", path, err)
	}
	err = unix.IoctlLoopConfigure(dev, cfg)
	if errors.Is(err, unix.EINVAL) && cfg.Info.Flags&unix.LO_FLAGS_DIRECT_IO != 0 {
		// Kernels that check direct I/O up front reject the whole
		// configuration instead of silently falling back; retry
		// buffered on the same, still unbound, device.
		cfg.Info.Flags &^= unix.LO_FLAGS_DIRECT_IO
		err = unix.IoctlLoopConfigure(dev, cfg)
	}
	if err != nil {
		unix.Close(dev)
		if errors.Is(err, unix.EBUSY) {
			// Another process bound this device between our
			// GET_FREE and LOOP_CONFIGURE: ask for another one.
			return nil, true, err
		}
		return nil, false, fmt.Errorf("loopdev: LOOP_CONFIGURE %s on %s: %w", path, abs, err)
	}
	d = &Device{Path: path, Number: n, BackingFile: abs, ReadOnly: readOnly}
	// The kernel clears LO_FLAGS_DIRECT_IO when the backing file cannot
	// do direct I/O at this block size; read back what it kept.
	info, err := unix.IoctlLoopGetStatus64(dev)
	unix.Close(dev)
	if err != nil {
		return nil, false, errors.Join(fmt.Errorf("loopdev: LOOP_GET_STATUS64 %s: %w", path, err), d.Detach())
	}
	d.directIO = info.Flags&unix.LO_FLAGS_DIRECT_IO != 0
	d.ReadOnly = info.Flags&unix.LO_FLAGS_READ_ONLY != 0
	d.backing = idOf(info)
	// Record the path as the kernel reports it (symlinks resolved), as
	// FindByBacking will.
	if bf, err := backingFileOf(n); err == nil {
		d.BackingFile = bf
	}
	return d, false, nil
}

func loFlags(opts Options) uint32 {
	var f uint32
	if opts.ReadOnly {
		f |= unix.LO_FLAGS_READ_ONLY
	}
	if opts.DirectIO {
		f |= unix.LO_FLAGS_DIRECT_IO
	}
	if opts.Autoclear {
		f |= unix.LO_FLAGS_AUTOCLEAR
	}
	return f
}

// ensureNode returns /dev/loopN, creating the node when /dev is not a
// devtmpfs (or devtmpfs has not caught up): GET_FREE may hand out devices
// beyond the ones created at boot.
func ensureNode(ctx context.Context, n int) (string, error) {
	path := devPath(n)
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	major, minor := uint32(loopMajor), uint32(n)
	if mm, err := readSysfs(n, "dev"); err == nil {
		if ma, mi, ok := parseMajorMinor(mm); ok {
			major, minor = ma, mi
		}
	}
	err := unix.Mknod(path, unix.S_IFBLK|0o600, int(unix.Mkdev(major, minor)))
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return "", fmt.Errorf("loopdev: mknod %s: %w", path, err)
	}
	return path, ctx.Err()
}

func devPath(n int) string { return "/dev/loop" + strconv.Itoa(n) }

// Detach unbinds the device from its backing file (LOOP_CLR_FD). Detaching a
// device that is no longer bound is not an error. If the device is still open
// elsewhere, the kernel defers the detach to the last close and Detach returns
// an error wrapping ErrBusy.
func (d *Device) Detach() error {
	deadline := time.Now().Add(busyWait)
	for {
		err := d.clearFD()
		if err == nil {
			break
		}
		if errors.Is(err, unix.ENXIO) {
			return nil // not bound: already detached
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("loopdev: LOOP_CLR_FD %s: %w", d.Path, err)
		}
		time.Sleep(10 * time.Millisecond) // retry backoff, not ordering
	}
	// The kernel releases the backing file when the last opener (here: our
	// own descriptor, closed in clearFD) goes away. Wait for it, so that a
	// caller that next removes the backing file does not find it busy.
	for {
		bound, err := d.stillBound()
		if err != nil {
			return fmt.Errorf("loopdev: detach %s: %w", d.Path, err)
		}
		if !bound {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("loopdev: detach %s deferred until the device is closed: %w", d.Path, ErrBusy)
		}
		time.Sleep(5 * time.Millisecond) // polling kernel state
	}
}

func (d *Device) clearFD() error {
	// O_RDONLY: LOOP_CLR_FD needs no write access, and a read-only open
	// works for read-only devices too.
	fd, err := unix.Open(d.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ours, err := d.boundToUs(fd)
	if err != nil {
		return err
	}
	if !ours {
		// Not bound, or the number was reused by someone else after our
		// device went away (autoclear, an earlier Detach): ours is detached.
		return unix.ENXIO
	}
	return unix.IoctlSetInt(fd, unix.LOOP_CLR_FD, 0)
}

// Resize makes the device pick up the backing file's current size
// (LOOP_SET_CAPACITY), after online expansion.
func (d *Device) Resize() error {
	return d.withFD(func(fd int) error {
		if err := unix.IoctlSetInt(fd, unix.LOOP_SET_CAPACITY, 0); err != nil {
			return fmt.Errorf("loopdev: LOOP_SET_CAPACITY %s: %w", d.Path, err)
		}
		return nil
	})
}

// Size returns the device size in bytes (BLKGETSIZE64).
func (d *Device) Size() (int64, error) {
	var size uint64
	err := d.withFD(func(fd int) error {
		var err error
		size, err = unix.IoctlGetUint64(fd, unix.BLKGETSIZE64)
		if err != nil {
			return fmt.Errorf("loopdev: BLKGETSIZE64 %s: %w", d.Path, err)
		}
		return nil
	})
	return int64(size), err
}

// LogicalBlockSize returns the device's logical block size (BLKSSZGET).
func (d *Device) LogicalBlockSize() (int, error) {
	var bs int
	err := d.withFD(func(fd int) error {
		var err error
		bs, err = unix.IoctlGetInt(fd, unix.BLKSSZGET)
		if err != nil {
			return fmt.Errorf("loopdev: BLKSSZGET %s: %w", d.Path, err)
		}
		return nil
	})
	return bs, err
}

// Sync writes the device's dirty pages down to the backing file and has the
// loop driver fsync the backing file (a block device fsync sends a flush,
// which loop turns into an fsync of its file).
func (d *Device) Sync() error {
	return d.withFD(func(fd int) error {
		if err := unix.Fsync(fd); err != nil {
			return fmt.Errorf("loopdev: fsync %s: %w", d.Path, err)
		}
		return nil
	})
}

func (d *Device) withFD(f func(fd int) error) error {
	fd, err := unix.Open(d.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loopdev: open %s: %w", d.Path, err)
	}
	defer unix.Close(fd)
	return f(fd)
}
