package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow"
	"github.com/cowcsi/cowcsi/cow/loopdev"
	"github.com/cowcsi/cowcsi/driver"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// env is everything the benchmark set up, torn down in reverse order.
type env struct {
	dir   string
	store *cow.Store
	fuse  driver.FileExport
	undo  []undoStep
}

type undoStep struct {
	what string
	f    func() error
}

func (e *env) onClose(what string, f func() error) { e.undo = append(e.undo, undoStep{what, f}) }

func (e *env) close() error {
	var errs []error
	for i := len(e.undo) - 1; i >= 0; i-- {
		t0 := time.Now()
		if err := e.undo[i].f(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", e.undo[i].what, err))
		}
		if d := time.Since(t0); d > time.Second {
			fmt.Fprintf(os.Stderr, "cleanup: %s took %v\n", e.undo[i].what, d.Round(100*time.Millisecond))
		}
	}
	e.undo = nil
	return errors.Join(errs...)
}

// countingVolume is the engine volume the FUSE file serves, as the driver
// serves it, counting Flush calls: the benchmark checks that an fsync of
// the loop device reaches the engine.
type countingVolume struct {
	*cow.Volume
	flushes atomic.Int64
	flushNS atomic.Int64 // time spent in Flush
	// inflight counts ReadAt and WriteAt calls in progress: how many
	// requests the serving process works on at once (sampled with RSS).
	inflight atomic.Int64
}

func (c *countingVolume) ReadAt(p []byte, off int64) (int, error) {
	c.inflight.Add(1)
	defer c.inflight.Add(-1)
	return c.Volume.ReadAt(p, off)
}

func (c *countingVolume) WriteAt(p []byte, off int64) (int, error) {
	c.inflight.Add(1)
	defer c.inflight.Add(-1)
	return c.Volume.WriteAt(p, off)
}

func (c *countingVolume) Flush() error {
	t0 := time.Now()
	err := c.Volume.Flush()
	c.flushNS.Add(int64(time.Since(t0)))
	c.flushes.Add(1)
	return err
}

func newEnv(ctx context.Context, dir string, ring bool) (*env, error) {
	if err := cleanStale(dir); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	e := &env{dir: dir}
	e.onClose("remove "+dir, func() error { return os.RemoveAll(dir) })
	st, err := cow.Open(filepath.Join(dir, "store"), cow.Options{})
	if err != nil {
		return nil, err
	}
	e.store = st
	e.onClose("close store", st.Close)
	// The driver's own export: its mount options and errno mapping. With
	// ring, "on" fails unless FUSE over io_uring is in use.
	ioURing := driver.FuseIOURingOff
	if ring {
		ioURing = driver.FuseIOURingOn
	}
	fs, err := driver.MountFuseExport(ctx, filepath.Join(dir, "fuse"), ioURing)
	if err != nil {
		e.close()
		return nil, err
	}
	e.fuse = fs
	e.onClose("unmount FUSE", fs.Unmount)
	return e, nil
}

// attach puts a loop device on path as the driver does: direct I/O, 4 KiB
// logical blocks.
func (e *env) attach(ctx context.Context, path string) (*loopdev.Device, error) {
	d, err := loopdev.Attach(ctx, path, loopdev.Options{DirectIO: true, LogicalBlockSize: cow.BlockSize})
	if err != nil {
		return nil, err
	}
	if !d.DirectIO() {
		d.Detach()
		return nil, fmt.Errorf("loop device on %s fell back to buffered I/O", path)
	}
	e.onClose("detach "+d.Path, func() error {
		if err := d.Detach(); err != nil && !errors.Is(err, loopdev.ErrBusy) {
			return err
		}
		return nil
	})
	return d, nil
}

// limitDevice creates a sparse file and attaches a loop device to it: the
// limit side of every ratio.
func (e *env) limitDevice(ctx context.Context, name string, size int64) (*loopdev.Device, error) {
	p := filepath.Join(e.dir, name+".img")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, err
	}
	err = f.Truncate(size)
	f.Close()
	if err != nil {
		return nil, err
	}
	e.onClose("remove "+p, func() error { return removeIfExists(p) })
	return e.attach(ctx, p)
}

// cowDevice creates an engine volume, serves it as a FUSE file and attaches
// a loop device to that file: what NodeStageVolume does.
func (e *env) cowDevice(ctx context.Context, id string, size int64) (*countingVolume, *loopdev.Device, error) {
	if _, err := e.store.CreateVolume(ctx, cow.VolumeSpec{ID: id, Size: size}); err != nil {
		return nil, nil, err
	}
	v, err := e.store.OpenVolume(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	cv := &countingVolume{Volume: v}
	e.onClose("close volume "+id, v.Close)
	if err := e.fuse.Add(id, cv, false); err != nil {
		return nil, nil, err
	}
	e.onClose("remove FUSE file "+id, func() error { return e.fuse.Remove(id) })
	d, err := e.attach(ctx, e.fuse.Path(id))
	if err != nil {
		return nil, nil, err
	}
	return cv, d, nil
}

// mountExt4 formats dev and mounts it under the work directory. Lazy
// inode-table and journal initialization are off so that no background
// zeroing runs during the measurements.
func (e *env) mountExt4(ctx context.Context, dev, name string) (string, error) {
	out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-b", "4096",
		"-E", "lazy_itable_init=0,lazy_journal_init=0", dev).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("mkfs.ext4 %s: %w\n%s", dev, err, out)
	}
	mnt := filepath.Join(e.dir, "mnt-"+name)
	if err := os.MkdirAll(mnt, 0o700); err != nil {
		return "", err
	}
	if err := unix.Mount(dev, mnt, "ext4", 0, ""); err != nil {
		return "", fmt.Errorf("mount %s: %w", dev, err)
	}
	e.onClose("unmount "+mnt, func() error { return unix.Unmount(mnt, 0) })
	return mnt, nil
}

func removeIfExists(p string) error {
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// cleanStale removes what an interrupted run left under dir: mounts (ext4
// and the FUSE mount, lazily), loop devices whose backing file is under dir,
// and the directory itself.
func cleanStale(dir string) error {
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	mounts, err := testutil.MountsUnder(dir)
	if err != nil {
		return err
	}
	for _, m := range mounts { // deepest first
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("unmount stale %s: %w", m, err)
		}
	}
	// loopdev.ClearFD, not Device.Detach: loopdev.Open stats the backing file, which fails
	// on a dead FUSE connection.
	loops, err := loopdev.BindingsUnder(dir)
	if err != nil {
		return err
	}
	for _, l := range loops {
		if err := loopdev.ClearFD(l.Path); err != nil {
			return fmt.Errorf("detach stale %s: %w", l.Path, err)
		}
	}
	return os.RemoveAll(dir)
}

// checkFlush writes a block of dev back unchanged and fdatasyncs the device;
// the loop driver must turn that into an FSYNC of the FUSE file, which must
// reach Volume.Flush.
func checkFlush(dev string, v *countingVolume) error {
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	buf := alignedBlock()
	if _, err := unix.Pread(fd, buf, 0); err != nil {
		return err
	}
	if _, err := unix.Pwrite(fd, buf, 0); err != nil {
		return err
	}
	before := v.flushes.Load()
	if err := unix.Fdatasync(fd); err != nil {
		return err
	}
	if v.flushes.Load() == before {
		return fmt.Errorf("fdatasync of %s did not reach Volume.Flush", dev)
	}
	return nil
}

func alignedBlock() []byte {
	b := make([]byte, 2*cow.BlockSize)
	off := cow.BlockSize - int(uintptr(unsafe.Pointer(&b[0]))%cow.BlockSize)
	return b[off : off+cow.BlockSize]
}

// syncfs writes back dirty pages of the filesystem holding dir (the limit
// files and the engine's layers), so that one run does not pay for the
// writeback of the run before.
func syncfs(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Syncfs(fd)
}

// layerFiles lists the data files of the layers in the store under dir.
func layerFiles(dir string) ([]string, error) {
	return filepath.Glob(filepath.Join(dir, "store", "layers", "*.data"))
}

// dropCache writes back and drops the page cache of files (the filesystem
// is synced first, so every page is clean and droppable).
func dropCache(dir string, files []string) error {
	if err := syncfs(dir); err != nil {
		return err
	}
	for _, p := range files {
		fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		err = unix.Fadvise(fd, 0, 0, unix.FADV_DONTNEED)
		unix.Close(fd)
		if err != nil {
			return err
		}
	}
	return nil
}

// cachedPages counts the pages of files in the page cache (cachestat(2))
// and the pages the files span.
func cachedPages(files []string) (cached, total uint64, err error) {
	for _, p := range files {
		fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return 0, 0, err
		}
		var cs unix.Cachestat_t
		r := unix.CachestatRange{} // Len 0: to the end of the file
		err = unix.Cachestat(uint(fd), &r, &cs, 0)
		var st unix.Stat_t
		if err == nil {
			err = unix.Fstat(fd, &st)
		}
		unix.Close(fd)
		if err != nil {
			return 0, 0, fmt.Errorf("%s: %w", p, err)
		}
		cached += cs.Cache
		total += uint64(st.Size+4095) / 4096
	}
	return cached, total, nil
}

// dropAllCaches writes back dir's file system and drops the machine's
// clean page cache, dentries and inodes (vm.drop_caches = 3).
func dropAllCaches(dir string) error {
	if err := syncfs(dir); err != nil {
		return err
	}
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3\n"), 0)
}
