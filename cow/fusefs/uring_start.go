package fusefs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/cowcsi/cowcsi/cow/fusefs/internal/uring"
)

const uringParam = "/sys/module/fuse/parameters/enable_uring"

// uringEnabled reports whether the kernel offers FUSE over io_uring to new
// connections (the fuse module's enable_uring parameter, off by default).
func uringEnabled() bool {
	b, err := os.ReadFile(uringParam)
	return err == nil && len(b) > 0 && (b[0] == 'Y' || b[0] == '1')
}

// IOURingSupported reports whether the kernel has FUSE over io_uring (the
// fuse module's enable_uring parameter exists, on or off).
func IOURingSupported() bool {
	_, err := os.Stat(uringParam)
	return err == nil
}

// EnableIOURing turns on the fuse module's enable_uring parameter (root),
// so that the kernel offers FUSE over io_uring to new connections. Only
// connections whose server asks for it (Options.IOURing) use it; others
// are unaffected. It fails on kernels without FUSE over io_uring.
func EnableIOURing() error {
	if uringEnabled() {
		return nil
	}
	if !IOURingSupported() {
		return errors.New("fusefs: kernel without FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)")
	}
	if err := os.WriteFile(uringParam, []byte("Y"), 0o644); err != nil {
		return fmt.Errorf("fusefs: turn on FUSE over io_uring: %w", err)
	}
	return nil
}

// refuseRing sends a registration the kernel must refuse (a queue that
// does not exist); a refused registration turns the ring off for the
// connection and releases the requests waiting for it.
func refuseRing(fd int) error {
	ring, err := uring.New(1, 0)
	if err != nil {
		return err
	}
	defer ring.Close()
	// On the heap: the kernel reads the iovecs by address.
	hdr, pay := make([]byte, ringHeaderSize), make([]byte, 4096)
	iov := &[2]unix.Iovec{{Base: &hdr[0], Len: uint64(len(hdr))}, {Base: &pay[0], Len: uint64(len(pay))}}
	sqe := ring.GetSQE()
	sqe.PrepURingCmd(int32(fd), uringCmdRegister, uint64(uintptr(unsafe.Pointer(&iov[0]))), 2, 0)
	cmd := sqe.Cmd()
	binary.LittleEndian.PutUint16(cmd[16:], 0xffff)
	c, err := ring.WaitCQE()
	runtime.KeepAlive(iov)
	runtime.KeepAlive(hdr)
	runtime.KeepAlive(pay)
	if err != nil {
		return err
	}
	if c.Res >= 0 {
		return errors.New("registration of queue 65535 was accepted")
	}
	return nil
}

// possibleCPUs is the kernel's nr_cpu_ids: the number of queues a ring
// needs before the kernel uses it.
func possibleCPUs() (int, error) {
	b, err := os.ReadFile("/sys/devices/system/cpu/possible")
	if err != nil {
		return 0, fmt.Errorf("fusefs: %w", err)
	}
	// "0-N" or "0"; ranges with gaps still end at the highest CPU.
	s := string(b)
	for len(s) > 0 && (s[len(s)-1] == '\n') {
		s = s[:len(s)-1]
	}
	last := s
	for k := len(s) - 1; k >= 0; k-- {
		if s[k] == '-' || s[k] == ',' {
			last = s[k+1:]
			break
		}
	}
	var n int
	if _, err := fmt.Sscan(last, &n); err != nil {
		return 0, fmt.Errorf("fusefs: possible CPUs %q: %w", s, err)
	}
	return n + 1, nil
}

// startRing moves request handling to FUSE over io_uring if the kernel
// negotiated it; on any failure /dev/fuse keeps serving (ringErr says why).
func (s *Server) startRing(fd int) {
	if s.srv.KernelSettings().Flags64()&fuse.CAP_OVER_IO_URING == 0 {
		unix.Close(fd)
		s.ringErr = errors.New("fusefs: the kernel does not offer FUSE over io_uring (fuse module parameter enable_uring)")
		return
	}
	// From here on the kernel holds every request until all queues are
	// registered or a registration failed: a failure before rs.start
	// (which handles its own) must refuse the ring explicitly.
	fail := func(err error) {
		if rerr := refuseRing(fd); rerr != nil {
			err = fmt.Errorf("%w; and falling back to /dev/fuse: %v", err, rerr)
		}
		unix.Close(fd)
		s.ringErr = err
	}
	nq, err := possibleCPUs()
	if err != nil {
		fail(err)
		return
	}
	entries := s.opts.RingEntries
	if entries <= 0 {
		entries = min(max(256/nq, 8), 32)
	}
	// The connection's number, from the mount table: a stat of the mount
	// would be a request, and requests wait for the ring (deadlock).
	conn, err := connID(s.dir)
	if err != nil {
		fail(err)
		return
	}
	rs := &ringServer{rfs: s.fs, fd: fd, refuseEntry: s.opts.refuseEntry}
	// A queue that fails while the connection is up would leave its CPU's
	// requests waiting forever: abort the connection, so that they fail.
	rs.onExit = func(qid int, err error) {
		klog.ErrorS(err, "FUSE ring queue failed, aborting the connection", "dir", s.dir, "queue", qid)
		if err := abortConn(conn); err != nil {
			klog.ErrorS(err, "Aborting the FUSE connection failed", "dir", s.dir)
		}
	}
	if err := rs.start(nq, entries, maxWrite()); err != nil {
		s.ringErr = err
		return
	}
	s.ring, s.ringDone = rs, make(chan struct{})
	go func() {
		defer close(s.ringDone)
		<-s.served
		// The connection is gone: every entry's command ends with an
		// error and the queues end by themselves.
		rs.wait()
	}()
}

// IOURing reports whether requests are served through FUSE over io_uring,
// and if not, why not (nil error when it was not asked for).
func (s *Server) IOURing() (bool, error) { return s.ring != nil, s.ringErr }

// RingQueues is the number of FUSE over io_uring queues serving, 0 when
// /dev/fuse serves everything. Each queue is a goroutine locked to its own
// OS thread, pinned to its CPU, that spends most of its time blocked in
// io_uring_enter(2) and keeps its P (GOMAXPROCS slot) while it does: a
// process that serves rings may want that many more Ps (the driver
// decides, see driver.MountFuseExport; fusefs leaves GOMAXPROCS alone).
func (s *Server) RingQueues() int {
	if s.ring == nil {
		return 0
	}
	return len(s.ring.queues)
}

// ringPolls is how many FUSE_POLL requests the ring answered (tests).
func (s *Server) ringPolls() uint64 {
	if s.ring == nil {
		return 0
	}
	return s.ring.polls.Load()
}

// ringRequests is how many requests the ring answered (tests).
func (s *Server) ringRequests() uint64 {
	if s.ring == nil {
		return 0
	}
	return s.ring.requests.Load()
}
