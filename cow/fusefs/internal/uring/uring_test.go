//go:build linux

package uring

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// testRing skips only when the kernel refuses io_uring outright (not built
// in, or disabled by sysctl kernel.io_uring_disabled); any other setup
// failure is a bug.
func testRing(tb testing.TB, entries uint32, flags SetupFlags) *Ring {
	tb.Helper()
	r, err := New(entries, flags)
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
		tb.Skipf("io_uring unavailable (%v); check kernel.io_uring_disabled", err)
	}
	if err != nil {
		tb.Fatalf("New(%d, %#x): %v", entries, uint32(flags), err)
	}
	tb.Cleanup(func() { _ = r.Close() })
	return r
}

func TestLayout(t *testing.T) {
	var s SQE
	sqe := []struct {
		name         string
		off, want    uintptr
		size, wantSz uintptr
	}{
		{"opcode", unsafe.Offsetof(s.Opcode), 0, unsafe.Sizeof(s.Opcode), 1},
		{"flags", unsafe.Offsetof(s.Flags), 1, unsafe.Sizeof(s.Flags), 1},
		{"ioprio", unsafe.Offsetof(s.IOPrio), 2, unsafe.Sizeof(s.IOPrio), 2},
		{"fd", unsafe.Offsetof(s.Fd), 4, unsafe.Sizeof(s.Fd), 4},
		{"off", unsafe.Offsetof(s.Off), 8, unsafe.Sizeof(s.Off), 8},
		{"addr", unsafe.Offsetof(s.Addr), 16, unsafe.Sizeof(s.Addr), 8},
		{"len", unsafe.Offsetof(s.Len), 24, unsafe.Sizeof(s.Len), 4},
		{"op_flags", unsafe.Offsetof(s.OpFlags), 28, unsafe.Sizeof(s.OpFlags), 4},
		{"user_data", unsafe.Offsetof(s.UserData), 32, unsafe.Sizeof(s.UserData), 8},
		{"buf_index", unsafe.Offsetof(s.BufIndex), 40, unsafe.Sizeof(s.BufIndex), 2},
		{"personality", unsafe.Offsetof(s.Personality), 42, unsafe.Sizeof(s.Personality), 2},
		{"splice_fd_in", unsafe.Offsetof(s.SpliceFdIn), 44, unsafe.Sizeof(s.SpliceFdIn), 4},
		{"addr3", unsafe.Offsetof(s.Addr3), 48, unsafe.Sizeof(s.Addr3), 8},
		{"pad2", unsafe.Offsetof(s.pad2), 56, unsafe.Sizeof(s.pad2), 8},
		{"ext", unsafe.Offsetof(s.ext), 64, unsafe.Sizeof(s.ext), 64},
	}
	for _, f := range sqe {
		if f.off != f.want || f.size != f.wantSz {
			t.Errorf("SQE.%s at %d size %d, want %d size %d", f.name, f.off, f.size, f.want, f.wantSz)
		}
	}
	if got := unsafe.Sizeof(s); got != 128 {
		t.Errorf("sizeof(SQE) = %d, want 128", got)
	}

	base := uintptr(unsafe.Pointer(&s))
	cmd := s.Cmd()
	if len(cmd) != 80 || uintptr(unsafe.Pointer(&cmd[0]))-base != 48 {
		t.Errorf("Cmd() = %d bytes at %d, want 80 at 48", len(cmd), uintptr(unsafe.Pointer(&cmd[0]))-base)
	}
	cmd[79] = 0xaa
	if s.ext[63] != 0xaa {
		t.Error("Cmd()[79] is not the SQE's last byte")
	}
	s.setCmdOp(0x01020304)
	raw := unsafe.Slice((*byte)(unsafe.Pointer(&s)), unsafe.Sizeof(s))
	if got := *(*uint32)(unsafe.Pointer(&raw[8])); got != 0x01020304 || s.cmdOp() != 0x01020304 {
		t.Errorf("cmd_op at 8 = %#x, cmdOp() = %#x", got, s.cmdOp())
	}

	var c CQE
	cqe := []struct {
		name      string
		off, want uintptr
	}{
		{"user_data", unsafe.Offsetof(c.UserData), 0},
		{"res", unsafe.Offsetof(c.Res), 8},
		{"flags", unsafe.Offsetof(c.Flags), 12},
		{"big_cqe", unsafe.Offsetof(c.BigCQE), 16},
	}
	for _, f := range cqe {
		if f.off != f.want {
			t.Errorf("CQE.%s at %d, want %d", f.name, f.off, f.want)
		}
	}
	if got := unsafe.Sizeof(c); got != 32 {
		t.Errorf("sizeof(CQE) = %d, want 32", got)
	}

	var p params
	if unsafe.Sizeof(p) != 120 || unsafe.Offsetof(p.sqOff) != 40 || unsafe.Offsetof(p.cqOff) != 80 {
		t.Errorf("io_uring_params: size %d, sq_off at %d, cq_off at %d; want 120, 40, 80",
			unsafe.Sizeof(p), unsafe.Offsetof(p.sqOff), unsafe.Offsetof(p.cqOff))
	}
}

func TestNop(t *testing.T) {
	r := testRing(t, 4, 0)
	if r.features&featSingleMMap == 0 {
		t.Log("kernel lacks IORING_FEAT_SINGLE_MMAP; using separate CQ mapping")
	}
	const ud = 0xdeadbeefcafef00d
	s := r.GetSQE()
	if s == nil {
		t.Fatal("GetSQE on an empty ring returned nil")
	}
	s.prepNop(ud)
	if n, err := r.Submit(); n != 1 || err != nil {
		t.Fatalf("Submit = %d, %v; want 1, nil", n, err)
	}
	c, err := r.WaitCQE()
	if err != nil {
		t.Fatal(err)
	}
	if c.UserData != ud || c.Res != 0 {
		t.Fatalf("CQE = %+v, want user_data %#x res 0", c, uint64(ud))
	}
	r.SeenCQE()
	if c, ok := r.PeekCQE(); ok {
		t.Fatalf("unexpected extra CQE %+v", c)
	}
	if n, err := r.Submit(); n != 0 || err != nil {
		t.Fatalf("empty Submit = %d, %v", n, err)
	}
}

func TestGetSQEFull(t *testing.T) {
	r := testRing(t, 8, 0)
	if r.sqLen != 8 || r.cqLen != 16 {
		t.Fatalf("ring sizes %d/%d, want 8/16", r.sqLen, r.cqLen)
	}
	for i := range 8 {
		s := r.GetSQE()
		if s == nil {
			t.Fatalf("GetSQE %d returned nil", i)
		}
		s.prepNop(uint64(i))
	}
	if s := r.GetSQE(); s != nil {
		t.Fatal("GetSQE on a full SQ returned a slot")
	}
	if n, err := r.SubmitAndWait(8); n != 8 || err != nil {
		t.Fatalf("SubmitAndWait = %d, %v", n, err)
	}
	if s := r.GetSQE(); s == nil {
		t.Fatal("GetSQE after submit returned nil")
	} else {
		s.prepNop(8)
	}
	if _, err := r.SubmitAndWait(9); err != nil {
		t.Fatal(err)
	}
	if n := r.ForEachCQE(func(CQE) {}); n != 9 {
		t.Fatalf("reaped %d CQEs, want 9", n)
	}
}

func openTemp(t *testing.T) *os.File {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "data"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	return f
}

func TestWriteRead(t *testing.T) {
	r := testRing(t, 8, 0)
	f := openTemp(t)
	fd := int32(f.Fd())

	const chunk, chunks = 16 << 10, 4
	want := make([]byte, chunk*chunks)
	for i := range want {
		want[i] = byte(i*7 + i>>9)
	}
	for i := range chunks {
		// Reverse order so the file is only correct if offsets are honoured.
		j := chunks - 1 - i
		r.GetSQE().PrepWrite(fd, want[j*chunk:(j+1)*chunk], uint64(j*chunk), uint64(j))
	}
	if n, err := r.SubmitAndWait(chunks); n != chunks || err != nil {
		t.Fatalf("SubmitAndWait(writes) = %d, %v", n, err)
	}
	r.ForEachCQE(func(c CQE) {
		if c.Res != chunk {
			t.Errorf("write %d: res %d, want %d", c.UserData, c.Res, chunk)
		}
	})

	got := make([]byte, len(want))
	for j := range chunks {
		r.GetSQE().PrepRead(fd, got[j*chunk:(j+1)*chunk], uint64(j*chunk), uint64(100+j))
	}
	if _, err := r.SubmitAndWait(chunks); err != nil {
		t.Fatal(err)
	}
	for range chunks {
		c, ok := r.PeekCQE()
		if !ok {
			t.Fatal("missing read CQE")
		}
		if c.Res != chunk {
			t.Errorf("read %d: res %d, want %d", c.UserData, c.Res, chunk)
		}
		r.SeenCQE()
	}
	if !bytes.Equal(got, want) {
		t.Fatal("data read back through the ring differs from what was written")
	}
	// The file as seen by an ordinary read must match too.
	if disk, err := os.ReadFile(f.Name()); err != nil || !bytes.Equal(disk, want) {
		t.Fatalf("os.ReadFile: %d bytes, err %v, equal %v", len(disk), err, bytes.Equal(disk, want))
	}
}

// TestWraparound pushes many more operations than slots through a tiny ring,
// with batch sizes that do not divide the ring size, so head and tail wrap at
// every possible position, and both reaping paths are used.
func TestWraparound(t *testing.T) {
	r := testRing(t, 8, 0)
	f := openTemp(t)
	fd := int32(f.Fd())
	const total = 1000
	bufs := make([][]byte, total)
	seen := make([]bool, total)
	next := 0
	for batch := 0; next < total; batch++ {
		size := min(batch%8+1, total-next)
		for range size {
			s := r.GetSQE()
			if s == nil {
				t.Fatalf("op %d: GetSQE nil with %d queued", next, r.sqReady())
			}
			if next%3 == 0 {
				bufs[next] = []byte{byte(next), byte(next >> 8)}
				s.PrepWrite(fd, bufs[next], uint64(next*2), uint64(next))
			} else {
				s.prepNop(uint64(next))
			}
			next++
		}
		n, err := r.SubmitAndWait(uint32(size))
		if err != nil || n != size {
			t.Fatalf("batch %d: SubmitAndWait = %d, %v; want %d", batch, n, err, size)
		}
		check := func(c CQE) {
			want := int32(0)
			if c.UserData%3 == 0 {
				want = 2
			}
			if c.UserData >= total || seen[c.UserData] || c.Res != want {
				t.Fatalf("bad CQE %+v (seen before: %v)", c, c.UserData < total && seen[c.UserData])
			}
			seen[c.UserData] = true
		}
		reaped := 0
		if batch%2 == 0 {
			reaped = r.ForEachCQE(check)
		} else {
			for {
				c, ok := r.PeekCQE()
				if !ok {
					break
				}
				check(c)
				r.SeenCQE()
				reaped++
			}
		}
		if reaped != size {
			t.Fatalf("batch %d: reaped %d, want %d", batch, reaped, size)
		}
	}
	for i, ok := range seen {
		if !ok {
			t.Fatalf("no CQE for op %d", i)
		}
	}
	disk, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < total; i += 3 {
		if disk[2*i] != byte(i) || disk[2*i+1] != byte(i>>8) {
			t.Fatalf("write %d not on disk", i)
		}
	}
}

// TestWaitForPipe checks that a read which cannot complete yet stays
// pending and that WaitCQE then blocks until data arrives, i.e. that waiting
// really goes through the kernel.
func TestWaitForPipe(t *testing.T) {
	r := testRing(t, 4, 0)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])

	buf := make([]byte, 16)
	r.GetSQE().PrepRead(int32(p[0]), buf, ^uint64(0), 7)
	if n, err := r.Submit(); n != 1 || err != nil {
		t.Fatalf("Submit = %d, %v", n, err)
	}
	if c, ok := r.PeekCQE(); ok {
		t.Fatalf("read of an empty pipe completed: %+v", c)
	}
	if _, err := unix.Write(p[1], []byte("hello")); err != nil {
		t.Fatal(err)
	}
	c, err := r.WaitCQE()
	if err != nil {
		t.Fatal(err)
	}
	r.SeenCQE()
	if c.UserData != 7 || c.Res != 5 || string(buf[:5]) != "hello" {
		t.Fatalf("CQE %+v, buf %q", c, buf[:c.Res])
	}
}

// TestSingleIssuer runs the flag combination a FUSE server thread would use:
// a locked thread, deferred task work and the task-run flag, so PeekCQE has
// to notice the flag and enter the kernel to get the completion posted.
func TestSingleIssuer(t *testing.T) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	r := testRing(t, 4, SetupSingleIssuer|SetupDeferTaskrun|setupTaskrunFlag)
	defer r.Close() // before the thread is unlocked

	r.GetSQE().prepNop(1)
	if _, err := r.SubmitAndWait(1); err != nil {
		t.Fatal(err)
	}
	if c, err := r.WaitCQE(); err != nil || c.UserData != 1 {
		t.Fatalf("WaitCQE = %+v, %v", c, err)
	}
	r.SeenCQE()

	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	buf := make([]byte, 8)
	r.GetSQE().PrepRead(int32(p[0]), buf, ^uint64(0), 2)
	if _, err := r.Submit(); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Write(p[1], []byte("x")); err != nil {
		t.Fatal(err)
	}
	// The pipe write queues the completion as local task work synchronously
	// and raises IORING_SQ_TASKRUN, so the CQE is available to a peek now.
	c, ok := r.PeekCQE()
	if !ok {
		t.Fatal("PeekCQE did not run deferred task work")
	}
	r.SeenCQE()
	if c.UserData != 2 || c.Res != 1 || buf[0] != 'x' {
		t.Fatalf("CQE %+v, buf %q", c, buf[:1])
	}
}

func TestURingCmdOnRegularFile(t *testing.T) {
	r := testRing(t, 4, 0)
	f := openTemp(t)
	s := r.GetSQE()
	s.PrepURingCmd(int32(f.Fd()), 1, 0, 0, 42)
	copy(s.Cmd(), "payload")
	if _, err := r.Submit(); err != nil {
		t.Fatal(err)
	}
	c, err := r.WaitCQE()
	if err != nil {
		t.Fatal(err)
	}
	r.SeenCQE()
	if c.UserData != 42 || c.Res >= 0 {
		t.Fatalf("CQE %+v, want user_data 42 and an error", c)
	}
	t.Logf("URING_CMD on a regular file: %v", unix.Errno(-c.Res))
}

func TestSetupFlagChecks(t *testing.T) {
	if _, err := New(8, 1<<3 /* CQSIZE */); !errors.Is(err, unix.EINVAL) {
		t.Errorf("New with CQSIZE: %v, want EINVAL", err)
	}
	if _, err := New(8, 1<<1 /* SQPOLL */); !errors.Is(err, unix.EINVAL) {
		t.Errorf("New with SQPOLL: %v, want EINVAL", err)
	}
}

func TestCloseTwice(t *testing.T) {
	r := testRing(t, 4, 0)
	r.GetSQE().prepNop(1)
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if r.GetSQE() != nil {
		t.Error("GetSQE on a closed ring returned a slot")
	}
	if _, err := r.Submit(); !errors.Is(err, errClosed) {
		t.Errorf("Submit after Close: %v", err)
	}
	if _, err := r.WaitCQE(); !errors.Is(err, errClosed) {
		t.Errorf("WaitCQE after Close: %v", err)
	}
	if _, ok := r.PeekCQE(); ok {
		t.Error("PeekCQE after Close found a CQE")
	}
}

func BenchmarkNop(b *testing.B) {
	for _, bc := range []struct {
		name   string
		flags  SetupFlags
		locked bool
	}{
		{"default", 0, false},
		{"singleissuer-defer", SetupSingleIssuer | SetupDeferTaskrun, true},
	} {
		b.Run(bc.name, func(b *testing.B) {
			if bc.locked {
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
			}
			const batch = 32
			r := testRing(b, batch, bc.flags)
			defer r.Close()
			// One op is one NOP; ns/op is per NOP, ns/batch per 32.
			batches := 0
			for done := 0; done < b.N; batches++ {
				n := min(batch, b.N-done)
				for i := range n {
					r.GetSQE().prepNop(uint64(done + i))
				}
				if _, err := r.SubmitAndWait(uint32(n)); err != nil {
					b.Fatal(err)
				}
				if got := r.ForEachCQE(func(CQE) {}); got != n {
					b.Fatalf("reaped %d, want %d", got, n)
				}
				done += n
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(batches), "ns/batch")
		})
	}
}

// TestCQOverflow completes more requests than the CQ holds before reaping.
// With IORING_FEAT_NODROP the kernel parks the excess and flags the SQ ring;
// ForEachCQE must notice the flag once the ring is drained and fetch them.
func TestCQOverflow(t *testing.T) {
	r := testRing(t, 4, 0)
	if r.features&featNoDrop == 0 {
		t.Skip("kernel drops overflowed CQEs (no IORING_FEAT_NODROP)")
	}
	const total = 20 // CQ has 8 slots
	for i := 0; i < total; i += 4 {
		for j := range 4 {
			r.GetSQE().prepNop(uint64(i + j))
		}
		if n, err := r.Submit(); n != 4 || err != nil {
			t.Fatalf("Submit after %d = %d, %v", i, n, err)
		}
	}
	if got := r.cqReady(); got != r.cqLen {
		t.Fatalf("cqReady = %d, want a full ring of %d", got, r.cqLen)
	}
	var order []uint64
	for len(order) < total {
		if r.ForEachCQE(func(c CQE) { order = append(order, c.UserData) }) == 0 {
			t.Fatalf("only %d of %d CQEs came back", len(order), total)
		}
	}
	for i, ud := range order {
		if ud != uint64(i) {
			t.Fatalf("CQE %d has user_data %d; order %v", i, ud, order)
		}
	}
}

// TestSparseBuffers fills one slot of a sparse registration and writes and
// reads a file with O_DIRECT through it; an empty slot and a range outside
// the slot's buffer are refused.
func TestSparseBuffers(t *testing.T) {
	r := testRing(t, 8, 0)
	defer r.Close()
	mem, err := unix.Mmap(-1, 0, 3<<16, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	if err := r.RegisterSparseBuffers(4); err != nil {
		t.Fatal(err)
	}
	f := openTemp(t)
	fd, err := unix.Open(f.Name(), unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("O_DIRECT on the test directory (tmpfs has none): %v", err)
	}
	defer unix.Close(fd)
	reg := mem[:2<<16] // slot 2; mem[2<<16:] is never registered
	src, dst := reg[1<<16:], reg[:1<<16]
	for i := range src {
		src[i] = byte(i*31 + i>>12)
	}
	do := func(what string, prep func(*SQE), res int32) {
		t.Helper()
		prep(r.GetSQE())
		c, err := r.WaitCQE()
		if err != nil {
			t.Fatal(err)
		}
		r.SeenCQE()
		if c.Res != res {
			t.Fatalf("%s: res %d, want %d", what, c.Res, res)
		}
	}
	efault := -int32(unix.EFAULT)
	do("write from an empty slot", func(s *SQE) { s.PrepWriteFixed(int32(fd), src, 0, 2, 1) }, efault)
	if err := r.UpdateBuffer(2, reg); err != nil {
		t.Fatal(err)
	}
	do("write from slot 2", func(s *SQE) { s.PrepWriteFixed(int32(fd), src, 4096, 2, 2) }, 1<<16)
	do("read into slot 2", func(s *SQE) { s.PrepReadFixed(int32(fd), dst, 4096, 2, 3) }, 1<<16)
	if !bytes.Equal(dst, src) {
		t.Fatal("data read back through the fixed buffer differs from what was written")
	}
	got := make([]byte, 1<<16)
	if _, err := f.ReadAt(got, 4096); err != nil || !bytes.Equal(got, src) {
		t.Fatalf("the file itself: err %v, equal %v", err, bytes.Equal(got, src))
	}
	do("read past slot 2's buffer", func(s *SQE) { s.PrepReadFixed(int32(fd), mem[2<<16:], 0, 2, 4) }, efault)
	do("read into another, empty slot", func(s *SQE) { s.PrepReadFixed(int32(fd), dst, 0, 3, 5) }, efault)
	if err := r.UpdateBuffer(9, reg); err == nil {
		t.Error("UpdateBuffer past the registered slots succeeded")
	}
}
