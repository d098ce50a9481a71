package main

import (
	"errors"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// kmsgWatch counts the kernel log lines of a FUSE io_uring teardown that
// does not complete: while a ring entry keeps a request, the kernel logs
// "ent-req-queue ..." every 50 ms, from 5 s after the connection's
// teardown began, for ever. The lines do not name the connection, so a
// count is for the whole machine since the watch began.
type kmsgWatch struct {
	mu    sync.Mutex
	fd    int
	lines int    // matching lines read so far
	last  string // the last of them
}

const teardownLogMarker = "ent-req-queue"

// openKmsg starts reading the kernel log at its current end; nil if
// /dev/kmsg cannot be read.
func openKmsg() *kmsgWatch {
	fd, err := unix.Open("/dev/kmsg", unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	if _, err := unix.Seek(fd, 0, unix.SEEK_END); err != nil {
		unix.Close(fd)
		return nil
	}
	return &kmsgWatch{fd: fd}
}

// count reads what the kernel logged since the last call and returns the
// number of matching lines since the watch began.
func (k *kmsgWatch) count() (int, string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	buf := make([]byte, 8192)
	for {
		n, err := unix.Read(k.fd, buf)
		if errors.Is(err, unix.EPIPE) {
			continue // records overwritten before we read them
		}
		if err != nil || n <= 0 {
			break
		}
		if rec := string(buf[:n]); strings.Contains(rec, teardownLogMarker) {
			k.lines++
			k.last = strings.TrimSpace(rec)
		}
	}
	return k.lines, k.last
}

func (k *kmsgWatch) close() { unix.Close(k.fd) }
