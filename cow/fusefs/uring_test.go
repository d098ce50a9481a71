package fusefs

import (
	"bytes"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// requireRing turns on the fuse module's enable_uring parameter (it only
// lets new connections that ask for FUSE over io_uring have it; others are
// unaffected, so it is left on) and skips where the kernel lacks it.
func requireRing(t *testing.T) {
	t.Helper()
	requireRoot(t)
	if _, err := os.Stat(uringParam); err != nil {
		t.Skipf("kernel without FUSE over io_uring: %v", err)
	}
	if err := EnableIOURing(); err != nil {
		t.Fatal(err)
	}
}

func mountRing(t *testing.T, opts Options) *Server {
	t.Helper()
	requireRing(t)
	opts.IOURing = true
	return mount(t, opts)
}

// eachTransport runs a test over /dev/fuse and over FUSE over io_uring.
func eachTransport(t *testing.T, body func(t *testing.T, o Options)) {
	t.Run("devfuse", func(t *testing.T) { body(t, Options{}) })
	t.Run("uring", func(t *testing.T) {
		requireRing(t)
		body(t, Options{IOURing: true})
	})
}

func TestRingReadWrite(t *testing.T) {
	s := mountRing(t, Options{})
	m := newMemFile(4 << 20)
	add(t, s, "vol", m, false)
	fd := openFile(t, s.Path("vol"), unix.O_RDWR)
	w := pattern(300000, 3)
	if n, err := unix.Pwrite(fd, w, 4097); err != nil || n != len(w) {
		t.Fatalf("pwrite: %d, %v", n, err)
	}
	if !bytes.Equal(m.bytes(4097, len(w)), w) {
		t.Fatal("write did not reach the BlockFile")
	}
	// Reads that need not wait are answered on the ring's thread, the
	// others on a goroutine (memFile alternates): both give the data.
	for k := range 4 {
		r := make([]byte, len(w))
		if n, err := unix.Pread(fd, r, 4097); err != nil || n != len(r) || !bytes.Equal(r, w) {
			t.Fatalf("pread %d: %d, %v, equal=%v", k, n, err, bytes.Equal(r, w))
		}
	}
	m.mu.Lock()
	noWaits := m.noWaits
	m.mu.Unlock()
	if noWaits < 4 {
		t.Fatalf("%d ReadAtNoWait calls for 4 reads", noWaits)
	}
	if err := unix.Fsync(fd); err != nil {
		t.Fatal(err)
	}
	if flushes, _ := m.counts(); flushes != 1 {
		t.Fatalf("%d Flush calls after one fsync, want 1", flushes)
	}
	// open, write, read, fsync at least: the ring served them, not
	// /dev/fuse.
	if n := s.ringRequests(); n < 4 {
		t.Fatalf("ring answered %d requests, want at least 4", n)
	}
}
