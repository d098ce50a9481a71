package fusefs

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// prepareMountpoint makes dir usable as a fresh mount point. A FUSE mount
// whose server died (a crashed driver) answers every access with ENOTCONN
// (with FUSE over io_uring the kernel aborts the connection a moment after
// the server's exit: a request caught in between ends with ECANCELED or
// ECONNABORTED);
// it is detached lazily, so loop devices that still reference its files keep
// their (failing) references without blocking the new mount. Mounts can
// stack, so repeat until dir is reachable.
func prepareMountpoint(ctx context.Context, dir string) error {
	for range 8 {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("fusefs: mount %s: %w", dir, err)
		}
		var st unix.Stat_t
		err := unix.Stat(dir, &st)
		switch {
		case isDeadConn(err):
			if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
				return fmt.Errorf("fusefs: detach stale mount at %s: %w", dir, err)
			}
			continue
		case errors.Is(err, unix.ENOENT):
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return fmt.Errorf("fusefs: %w", err)
			}
			continue
		case err != nil:
			return fmt.Errorf("fusefs: stat %s: %w", dir, err)
		case st.Mode&unix.S_IFMT != unix.S_IFDIR:
			return fmt.Errorf("fusefs: mount point %s is not a directory: %w", dir, unix.ENOTDIR)
		}
		mounted, err := mountinfo.Mounted(dir)
		if err != nil {
			return fmt.Errorf("fusefs: %w", err)
		}
		if mounted {
			// A live server (another instance of the driver?) is
			// mounted here; stacking on top of it would hide its files.
			return fmt.Errorf("fusefs: %s is already a mount point: %w", dir, unix.EBUSY)
		}
		return nil
	}
	return fmt.Errorf("fusefs: %s: stale mounts keep reappearing", dir)
}

// mountFUSE mounts a FUSE filesystem at dir and returns the /dev/fuse
// descriptor that serves it.
//
// It mounts itself instead of letting go-fuse do it because go-fuse's
// direct mount (v2.12.1) opens /dev/fuse without O_CLOEXEC: every child
// process (mkfs, mount, fio) then inherits the connection. If the driver
// dies, such a child keeps the connection alive with nobody serving it, so
// I/O on the loop device hangs in D state instead of failing with ENOTCONN,
// and the stale mount cannot be recognized. Seen in this package's own
// benchmark. Mounting needs CAP_SYS_ADMIN (the node plugin is privileged);
// there is no fusermount fallback.
func mountFUSE(dir string, mo *fuse.MountOptions) (int, error) {
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("fusefs: open /dev/fuse: %w", err)
	}
	// The options fusermount would pass; max_read matches go-fuse's
	// buffers (MaxWrite).
	data := strings.Join([]string{
		"fd=" + strconv.Itoa(fd),
		"rootmode=40000",
		"user_id=" + strconv.Itoa(os.Geteuid()),
		"group_id=" + strconv.Itoa(os.Getegid()),
		"max_read=" + strconv.Itoa(mo.MaxWrite),
	}, ",")
	if err := unix.Mount(mo.FsName, dir, "fuse."+mo.Name, unix.MS_NOSUID|unix.MS_NODEV, data); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("fusefs: mount %s: %w", dir, err)
	}
	return fd, nil
}

// maxWrite is the largest READ/WRITE request: 1 MiB, or less if the
// kernel's fuse max_pages_limit is lower.
func maxWrite() int {
	const want = 1 << 20
	limit := want
	if b, err := os.ReadFile("/proc/sys/fs/fuse/max_pages_limit"); err == nil {
		if pages, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pages > 0 {
			limit = pages * os.Getpagesize()
		}
	}
	return min(want, limit)
}

// fsType names the filesystem type: the mount table shows "fuse.cowcsi".
const fsType = "cowcsi"

// go-fuse's poll-hack file (its fuse/poll.go): go-fuse answers for it on
// /dev/fuse, pollHackReply on the ring.
const (
	pollHackName = ".go-fuse-epoll-hack"
	pollHackIno  = ^uint64(0)
)

// pollHack does what go-fuse's WaitMount does for mounts it made itself:
// it opens go-fuse's magic file and polls it, so that the kernel learns at
// once that this filesystem does not implement POLL (ENOSYS).
//
// Why it matters: Go's os.Open registers every file with the runtime's
// epoll, and epoll_ctl on a FUSE file sends FUSE_POLL and waits for the
// answer inside the runtime, holding its P (GOMAXPROCS slot) and blocking
// any stop-the-world. The answer needs a Go thread of this very process
// (a ring queue or go-fuse's reader) to run: a garbage collection that
// starts in that window, or the other Ps taken the same way, deadlocks the
// process. Here the poll is a plain blocking syscall, which releases its P.
func pollHack(dir string) error {
	fd, err := unix.Open(filepath.Join(dir, pollHackName), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("fusefs: poll hack: %w", err)
	}
	defer unix.Close(fd)
	_, err = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLPRI | unix.POLLOUT}}, 0)
	if err != nil {
		return fmt.Errorf("fusefs: poll hack: %w", err)
	}
	return nil
}

// isDeadConn reports whether err is what the kernel answers on a FUSE
// connection whose server is gone.
func isDeadConn(err error) bool {
	return errors.Is(err, unix.ENOTCONN) || errors.Is(err, unix.ECONNABORTED) || errors.Is(err, unix.ECANCELED)
}

// connID is the FUSE connection number of the mount at dir (its device
// minor: /sys/fs/fuse/connections/<N>), read from the mount table without
// a request to the filesystem.
func connID(dir string) (int, error) {
	ms, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(dir))
	if err != nil {
		return 0, fmt.Errorf("fusefs: mount table: %w", err)
	}
	if len(ms) == 0 {
		return 0, fmt.Errorf("fusefs: %s is not in the mount table", dir)
	}
	return ms[len(ms)-1].Minor, nil
}

// abortConn aborts FUSE connection conn through the fusectl filesystem: its
// requests fail from then on instead of waiting. fusectl is mounted at its
// usual place if nothing mounted it yet (containers, minimal hosts).
func abortConn(conn int) error {
	const ctl = "/sys/fs/fuse/connections"
	p := fmt.Sprintf("%s/%d/abort", ctl, conn)
	if _, err := os.Stat(p); errors.Is(err, os.ErrNotExist) {
		if err := unix.Mount("fusectl", ctl, "fusectl", 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("fusefs: mount fusectl at %s: %w", ctl, err)
		}
	}
	if err := os.WriteFile(p, []byte("1"), 0o200); err != nil {
		return fmt.Errorf("fusefs: abort connection %d: %w", conn, err)
	}
	return nil
}

// Connections returns the FUSE connection numbers of the fuse.cowcsi mounts
// at dir (mounts can stack), read from the mount table only: a stat of a
// wedged mount would wait forever.
func Connections(dir string) ([]int, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("fusefs: %w", err)
	}
	ms, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(dir))
	if err != nil {
		return nil, fmt.Errorf("fusefs: mount table: %w", err)
	}
	var conns []int
	for _, m := range ms {
		if m.FSType == "fuse."+fsType {
			conns = append(conns, m.Minor)
		}
	}
	return conns, nil
}

// AbortConnection aborts FUSE connection conn (see Connections): every
// request waiting on it fails, so a process stuck in one can exit.
func AbortConnection(conn int) error { return abortConn(conn) }
