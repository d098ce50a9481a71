package fusefs

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/internal/blockio"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// requireRing turns on the fuse module's enable_uring parameter (it only
// lets new connections that ask for FUSE over io_uring have it; others are
// unaffected, so it is left on) and skips where the kernel lacks it.
func requireRing(t *testing.T) {
	t.Helper()
	testutil.RequireRoot(t, testutil.DevFUSE)
	if !IOURingSupported() {
		t.Skip("kernel without FUSE over io_uring (no fuse module parameter enable_uring)")
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

// plannedFile is a BlockFile on a plain file whose reads always "would
// wait" and are planned as reads of that file, as cow.Volume plans reads of
// its layers: the ring reads them through io_uring.
type plannedFile struct {
	f        *os.File
	size     int64
	plans    atomic.Int32
	releases atomic.Int32
}

func (b *plannedFile) ReadAt(p []byte, off int64) (int, error)  { return b.f.ReadAt(p, off) }
func (b *plannedFile) WriteAt(p []byte, off int64) (int, error) { return b.f.WriteAt(p, off) }
func (b *plannedFile) Flush() error                             { return b.f.Sync() }
func (b *plannedFile) Size() int64                              { return b.size }
func (b *plannedFile) Discard(off, length int64) error          { return nil }
func (b *plannedFile) ReadAtNoWait([]byte, int64) (int, error)  { return 0, syscall.EAGAIN }

// PlanRead reads the first half of p from the file and zero-fills the
// rest itself, so the test sees both parts of a plan.
func (b *plannedFile) PlanRead(p []byte, off int64) (*blockio.Plan, error) {
	b.plans.Add(1)
	n := min(int64(len(p)), b.size-off)
	half := n / 2 &^ 511
	clear(p[half:n])
	return &blockio.Plan{
		Segs:    []blockio.Seg{{Fd: int(b.f.Fd()), Off: off, Buf: p[:half]}},
		N:       int(n),
		Release: func() { b.releases.Add(1) },
	}, nil
}

func TestRingPlannedReads(t *testing.T) {
	s := mountRing(t, Options{})
	const size = 1 << 20
	f, err := os.Create(filepath.Join(t.TempDir(), "backing"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := pattern(size, 9)
	if _, err := f.WriteAt(w, 0); err != nil {
		t.Fatal(err)
	}
	b := &plannedFile{f: f, size: size}
	add(t, s, "vol", b, false)
	fd := openFile(t, s.Path("vol"), unix.O_RDONLY)
	for _, c := range []struct{ off, n int }{{0, 4096}, {8192, 65536}, {size - 4096, 4096}, {12288, size - 12288}} {
		got := make([]byte, c.n)
		n, err := unix.Pread(fd, got, int64(c.off))
		if err != nil || n != c.n {
			t.Fatalf("pread %d at %d: %d, %v", c.n, c.off, n, err)
		}
		// Direct I/O with max_read 1 MiB: one READ request per pread,
		// its first half from the file, the rest zeros.
		half := c.n / 2 &^ 511
		if !bytes.Equal(got[:half], w[c.off:c.off+half]) || !bytes.Equal(got[half:], make([]byte, c.n-half)) {
			t.Fatalf("read of %d at %d: not the file's first half and zeros", c.n, c.off)
		}
	}
	if p, r := b.plans.Load(), b.releases.Load(); p == 0 || p != r {
		t.Fatalf("%d plans, %d released", p, r)
	}
	// The last read's file read (over 256 KiB) went into the entry's
	// payload registered as a fixed buffer.
	if s.ring.fixedIO.Load() == 0 {
		t.Error("no large read was submitted into a fixed buffer")
	}
}

// TestRingQueueFailureAborts: a queue that ends with an error while the
// connection is up aborts the connection, so that requests fail instead of
// waiting for that queue forever.
func TestRingQueueFailureAborts(t *testing.T) {
	s := mountRing(t, Options{})
	add(t, s, "vol", newMemFile(8192), false)
	fd := openFile(t, s.Path("vol"), unix.O_RDONLY)
	buf := make([]byte, 4096)
	if _, err := unix.Pread(fd, buf, 0); err != nil {
		t.Fatal(err)
	}
	s.ring.onExit(0, errors.New("injected failure"))
	// A direct-I/O read is always a request (a stat could come from the
	// attribute cache).
	if _, err := unix.Pread(fd, buf, 0); !isDeadConn(err) {
		t.Fatalf("read after the abort: %v, want a dead connection", err)
	}
}

// TestRingRefusedCommitAborts: a commit the kernel refuses leaves its
// request unanswered for good; the queue must end and abort the connection,
// so that the request fails instead of waiting forever.
func TestRingRefusedCommitAborts(t *testing.T) {
	s := mountRing(t, Options{})
	add(t, s, "vol", newMemFile(8192), false)
	fd := openFile(t, s.Path("vol"), unix.O_RDONLY)
	buf := make([]byte, 4096)
	s.ring.badCommit.Store(true)
	var err error
	guard(t, s.Dir(), "read", func() error {
		_, err = unix.Pread(fd, buf, 0)
		return nil
	})
	if !isDeadConn(err) {
		t.Fatalf("read answered by a refused commit: %v, want a dead connection", err)
	}
}

// TestRingSetupFailureFallsBack: once INIT offered the ring the kernel holds
// every request until all queues are registered or one registration failed;
// a queue that cannot even be set up must still release them to /dev/fuse.
func TestRingSetupFailureFallsBack(t *testing.T) {
	requireRing(t)
	dir := filepath.Join(t.TempDir(), "mnt")
	var s *Server
	// No ring of 2^20 entries per queue can be set up (io_uring's limit is
	// 32768; the buffers would need a TiB per queue).
	guard(t, dir, "Mount", func() (err error) {
		s, err = Mount(t.Context(), dir, Options{IOURing: true, RingEntries: 1 << 20})
		return err
	})
	t.Cleanup(func() {
		if err := s.Unmount(); err != nil {
			t.Errorf("cleanup Unmount: %v", err)
		}
	})
	if on, err := s.IOURing(); on || err == nil {
		t.Fatalf("IOURing() = %v, %v; want false and why", on, err)
	}
	add(t, s, "vol", newMemFile(8192), false)
	guard(t, dir, "read", func() error {
		_, err := os.ReadFile(s.Path("vol"))
		return err
	})
}

// guard runs f, which touches the mount at dir (Mount's poll hack, a read)
// and would wait forever if the ring were left half set up; after 20 s it
// aborts the connection rather than leave the test in the kernel.
func guard(t *testing.T, dir, what string, f func() error) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	case <-time.After(20 * time.Second):
		if conn, err := connID(dir); err == nil {
			_ = abortConn(conn)
		}
		_ = unix.Unmount(dir, unix.MNT_DETACH)
		t.Fatalf("%s still waits for the ring after 20 s", what)
	}
}

// TestRingRefusedRegistrations: the kernel uses the ring for good once
// every queue holds an entry, whatever registrations it refused; a queue
// left with none keeps the ring from ever being used. Either way requests
// must be answered.
func TestRingRefusedRegistrations(t *testing.T) {
	requireRing(t)
	nq, err := possibleCPUs()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		refuse func(qid, i int) bool
		ring   bool
	}{
		{"one entry of every queue", func(_, i int) bool { return i == 1 }, true},
		{"every entry of the last queue", func(qid, _ int) bool { return qid == nq-1 }, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "mnt")
			var s *Server
			guard(t, dir, "Mount", func() (err error) {
				s, err = Mount(t.Context(), dir, Options{IOURing: true, RingEntries: 4, refuseEntry: c.refuse})
				return err
			})
			t.Cleanup(func() {
				if err := s.Unmount(); err != nil {
					t.Errorf("cleanup Unmount: %v", err)
				}
			})
			if on, why := s.IOURing(); on != c.ring {
				t.Fatalf("IOURing() = %v (%v), want %v", on, why, c.ring)
			}
			m := newMemFile(1 << 20)
			add(t, s, "vol", m, false)
			want := pattern(64<<10, 7)
			var got []byte
			guard(t, dir, "write and read", func() error {
				f, err := os.OpenFile(s.Path("vol"), os.O_RDWR, 0)
				if err != nil {
					return err
				}
				defer f.Close()
				if _, err := f.WriteAt(want, 8192); err != nil {
					return err
				}
				got = make([]byte, len(want))
				_, err = f.ReadAt(got, 8192)
				return err
			})
			if !bytes.Equal(got, want) || !bytes.Equal(m.bytes(8192, len(want)), want) {
				t.Fatal("data read back differs from what was written")
			}
			if c.ring && s.ringRequests() == 0 {
				t.Fatal("the ring answered no request")
			}
		})
	}
}

// TestRingPollHack: Mount's poll of go-fuse's magic file must reach the
// ring and turn POLL off for the connection, so that Go opens of volume
// files in this process (epoll_ctl inside the runtime, holding a P) never
// wait for a FUSE_POLL answer: that wait can deadlock the process against
// a garbage collection (pollHack).
func TestRingPollHack(t *testing.T) {
	s := mountRing(t, Options{})
	if got := s.ringPolls(); got != 1 {
		t.Fatalf("POLL requests on the ring after Mount: %d, want 1 (the poll hack's)", got)
	}
	add(t, s, "vol", newMemFile(1<<20), false)
	for range 3 {
		f, err := os.Open(s.Path("vol")) // registers with the netpoller
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	if got := s.ringPolls(); got != 1 {
		t.Fatalf("POLL requests on the ring after Go opens: %d, want still 1", got)
	}
}

// procsAtStart is GOMAXPROCS before any test ran (package variables are
// set before tests start, and no ring serves before then).
var procsAtStart = runtime.GOMAXPROCS(0)

// TestRingQueuesLeavesProcs: a ring serves with one queue per possible CPU
// and says so (RingQueues), and fusefs leaves GOMAXPROCS alone, however
// many rings serve: reserving Ps for the queues is the driver's decision
// (driver.MountFuseExport, TestMountFuseExportReservesProcs).
func TestRingQueuesLeavesProcs(t *testing.T) {
	nq, err := possibleCPUs()
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if got := mountRing(t, Options{}).RingQueues(); got != nq {
			t.Fatalf("RingQueues %d, want %d (possible CPUs)", got, nq)
		}
	}
	if got := runtime.GOMAXPROCS(0); got != procsAtStart {
		t.Fatalf("GOMAXPROCS %d after two ring mounts, started at %d: fusefs changed it", got, procsAtStart)
	}
	if got := mount(t, Options{}).RingQueues(); got != 0 {
		t.Fatalf("RingQueues %d on /dev/fuse, want 0", got)
	}
}
