package loopdev

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// sysBlock is where the kernel publishes loop state; a variable so that a
// test could point it elsewhere.
var sysBlock = "/sys/block"

// FindByBacking returns the loop devices currently bound to backingFile, by
// scanning /sys/block/loop*/loop/backing_file (see Bindings), and opens
// each.
func FindByBacking(backingFile string) ([]*Device, error) {
	abs, err := filepath.Abs(backingFile)
	if err != nil {
		return nil, fmt.Errorf("loopdev: %w", err)
	}
	// The kernel reports the path with symlinks resolved. Resolution fails
	// for a file that is gone (or on a dead FUSE mount): then compare the
	// path as given.
	if resolved, err := filepath.EvalSymlinks(abs); err == nil {
		abs = resolved
	}
	bound, err := Bindings()
	if err != nil {
		return nil, err
	}
	var out []*Device
	for _, b := range bound {
		if b.BackingFile != abs {
			continue
		}
		d, err := open(b.Number)
		if err != nil {
			if errors.Is(err, unix.ENXIO) || errors.Is(err, fs.ErrNotExist) {
				continue // detached meanwhile
			}
			return nil, err
		}
		out = append(out, d)
	}
	return out, nil
}

// Open returns the attached loop device at path (/dev/loopN). It fails
// wrapping unix.ENXIO if the device is not bound to a file.
func Open(path string) (*Device, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil, fmt.Errorf("loopdev: stat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return nil, fmt.Errorf("loopdev: %s is not a block device: %w", path, unix.ENOTBLK)
	}
	// The number comes from sysfs rather than the minor: with max_part
	// set, minors are N << part_shift.
	n, err := numberOfDev(unix.Major(st.Rdev), unix.Minor(st.Rdev))
	if err != nil {
		return nil, err
	}
	d, err := open(n)
	if err != nil {
		return nil, err
	}
	d.Path = path
	return d, nil
}

// open reads the state of bound loop device n.
func open(n int) (*Device, error) {
	d := &Device{Path: devPath(n), Number: n}
	fd, err := unix.Open(d.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("loopdev: open %s: %w", d.Path, err)
	}
	defer unix.Close(fd)
	info, err := unix.IoctlLoopGetStatus64(fd)
	if err != nil && !errors.Is(err, unix.ENXIO) {
		// The kernel stats the backing file to answer LOOP_GET_STATUS64;
		// with the file's FUSE server dead that fails (ENOTCONN), exactly
		// for the devices a restarted driver must clean up. sysfs still
		// describes the device: identify it by the path it reports.
		bf, serr := backingFileOf(n)
		if serr != nil {
			return nil, fmt.Errorf("loopdev: LOOP_GET_STATUS64 %s: %w", d.Path, err)
		}
		d.BackingFile = bf
		dio, _ := readSysfs(n, "loop/dio")
		ro, _ := readSysfs(n, "ro")
		d.directIO, d.ReadOnly = dio == "1", ro == "1"
		return d, nil
	}
	if err != nil {
		return nil, fmt.Errorf("loopdev: LOOP_GET_STATUS64 %s: %w", d.Path, err)
	}
	d.directIO = info.Flags&unix.LO_FLAGS_DIRECT_IO != 0
	d.ReadOnly = info.Flags&unix.LO_FLAGS_READ_ONLY != 0
	d.backing = idOf(info)
	if bf, err := backingFileOf(n); err == nil {
		d.BackingFile = bf
	}
	return d, nil
}

// boundToUs reports whether the device behind fd is still bound to d's
// backing file: by device and inode when the kernel can tell them, else
// (backing file unreachable, or d opened without them) by the sysfs path.
func (d *Device) boundToUs(fd int) (bool, error) {
	info, err := unix.IoctlLoopGetStatus64(fd)
	if errors.Is(err, unix.ENXIO) {
		return false, nil
	}
	if err == nil && d.backing != (fileID{}) {
		return idOf(info) == d.backing, nil
	}
	cur, serr := backingFileOf(d.Number)
	if errors.Is(serr, fs.ErrNotExist) {
		return false, nil
	}
	if serr != nil {
		return false, serr
	}
	return d.BackingFile == "" || cur == d.BackingFile, nil
}

// numberOfDev finds the loop device whose sysfs dev file is major:minor.
func numberOfDev(major, minor uint32) (int, error) {
	want := fmt.Sprintf("%d:%d", major, minor)
	entries, err := os.ReadDir(sysBlock)
	if err != nil {
		return 0, fmt.Errorf("loopdev: %w", err)
	}
	for _, e := range entries {
		n, ok := loopNumber(e.Name())
		if !ok {
			continue
		}
		if dev, err := readSysfs(n, "dev"); err == nil && dev == want {
			return n, nil
		}
	}
	return 0, fmt.Errorf("loopdev: no loop device %s: %w", want, unix.ENODEV)
}

// stillBound reports whether d's device is still bound to d's backing file.
// Comparing the file keeps a concurrent reuse of the number by someone else
// from looking like our device.
func (d *Device) stillBound() (bool, error) {
	if _, err := backingFileOf(d.Number); errors.Is(err, fs.ErrNotExist) {
		return false, nil // no loop/ directory in sysfs: unbound
	}
	fd, err := unix.Open(d.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENOENT) {
		return false, nil // being torn down, or removed
	}
	if err != nil {
		return false, err
	}
	defer unix.Close(fd)
	return d.boundToUs(fd)
}

// backingFileOf returns the backing file of bound loop device n, or an error
// wrapping fs.ErrNotExist when it is not bound. A deleted backing file is
// reported by the kernel with a " (deleted)" suffix, which is stripped.
func backingFileOf(n int) (string, error) {
	s, err := readSysfs(n, "loop/backing_file")
	if err != nil {
		return "", err
	}
	return strings.TrimSuffix(s, " (deleted)"), nil
}

func readSysfs(n int, rel string) (string, error) {
	b, err := os.ReadFile(filepath.Join(sysBlock, "loop"+strconv.Itoa(n), rel))
	if err != nil {
		return "", err
	}
	return strings.TrimRight(string(b), "\n"), nil
}

func loopNumber(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, "loop")
	if !ok {
		return 0, false
	}
	n, err := strconv.Atoi(rest)
	return n, err == nil && n >= 0
}

func parseMajorMinor(s string) (uint32, uint32, bool) {
	a, b, ok := strings.Cut(s, ":")
	if !ok {
		return 0, 0, false
	}
	ma, err1 := strconv.ParseUint(a, 10, 32)
	mi, err2 := strconv.ParseUint(b, 10, 32)
	return uint32(ma), uint32(mi), err1 == nil && err2 == nil
}
