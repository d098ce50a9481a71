package fusefs

import (
	"syscall"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/fusefs/internal/uring"
	"github.com/cowcsi/cowcsi/cow/internal/blockio"
)

// fixedMin is the smallest file read or write that uses the entry's
// payload as a fixed buffer. A direct read or write pins its buffer's
// pages for each request; a fixed buffer was pinned once, when registered
// (docs/DECISIONS.md, "Fixed buffers for the ring's large I/O").
// Registering pins all of the payload (maxWrite), so only entries that
// carry large requests, whose payload is then mostly in memory anyway, are
// registered.
const fixedMin = 256 << 10

// fixedBuf reports whether buf, a file read's or write's buffer for entry
// i, is in the entry's payload and that payload is registered as fixed
// buffer i, registering it on its first large request.
func (q *ringQueue) fixedBuf(i int, buf []byte) bool {
	e := &q.entries[i]
	if len(buf) < fixedMin || e.fixed < 0 {
		return false
	}
	p0 := uintptr(unsafe.Pointer(unsafe.SliceData(e.pay)))
	b0 := uintptr(unsafe.Pointer(unsafe.SliceData(buf)))
	if b0 < p0 || b0+uintptr(len(buf)) > p0+uintptr(len(e.pay)) {
		return false
	}
	if e.fixed == 0 {
		e.fixed = -1
		if err := q.ring.UpdateBuffer(uint32(i), e.pay); err == nil {
			e.fixed = 1
		}
	}
	return e.fixed > 0
}

// startIO submits the plan's file reads or writes for entry i; ioDone
// answers the entry when the last one completes.
func (q *ringQueue) startIO(i int, pl *blockio.Plan) {
	e := &q.entries[i]
	e.plan, e.pending, e.status = pl, 0, fuse.OK
	if pl.Write {
		q.writing++
	}
	for k, sg := range pl.Segs {
		sqe := q.getSQE()
		if sqe == nil {
			e.status = fuse.EIO
			break
		}
		ud := ioTag | uint64(i)<<segBits | uint64(k)
		fixed := q.fixedBuf(i, sg.Buf)
		switch {
		case pl.Write && fixed:
			sqe.PrepWriteFixed(int32(sg.Fd), sg.Buf, uint64(sg.Off), uint16(i), ud)
		case pl.Write:
			sqe.PrepWrite(int32(sg.Fd), sg.Buf, uint64(sg.Off), ud)
		case fixed:
			sqe.PrepReadFixed(int32(sg.Fd), sg.Buf, uint64(sg.Off), uint16(i), ud)
		default:
			sqe.PrepRead(int32(sg.Fd), sg.Buf, uint64(sg.Off), ud)
		}
		if !pl.Write {
			sqe.OpFlags = uint32(sg.Flags)
		}
		if fixed {
			q.rs.fixedIO.Add(1)
		}
		e.pending++
	}
	if e.pending == 0 {
		q.endIO(i)
	}
}

func (q *ringQueue) ioDone(c uring.CQE) {
	i := int(c.UserData&^ioTag) >> segBits
	k := int(c.UserData & (1<<segBits - 1))
	e := &q.entries[i]
	sg := e.plan.Segs[k]
	switch {
	case c.Res < 0:
		e.status = q.rs.rfs.errno(syscall.Errno(-c.Res))
	case int(c.Res) < len(sg.Buf) && e.plan.Write:
		// A short write (a disk filling up): the rest here, where an
		// error has its cause.
		if err := pwriteAll(sg.Fd, sg.Buf[c.Res:], sg.Off+int64(c.Res)); err != nil {
			e.status = q.rs.rfs.errno(err)
		}
	case int(c.Res) < len(sg.Buf):
		clear(sg.Buf[c.Res:]) // past the end of a shorter layer's file
	}
	e.pending--
	if e.pending == 0 {
		q.endIO(i)
	}
}

// pwriteAll writes all of p at off to fd.
func pwriteAll(fd int, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pwrite(fd, p, off)
		if err != nil {
			return err
		}
		if n == 0 {
			return syscall.EIO
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

func (q *ringQueue) endIO(i int) {
	e := &q.entries[i]
	pl := e.plan
	if pl.Write && e.status == fuse.OK {
		pl.Commit()
	}
	q.release(e)
	n := pl.N
	if pl.Write {
		out := fuse.WriteOut{Size: uint32(pl.N)}
		n = putOut(e, &out)
	}
	reply(e, e.status, n)
	q.commit(i)
}

// drainIO waits for the file reads and writes still in flight (their
// buffers and files must outlive them) and releases their plans; the
// writes among them count as failed.
func (q *ringQueue) drainIO() {
	inflight := 0
	for i := range q.entries {
		inflight += q.entries[i].pending
	}
	for inflight > 0 {
		if _, err := q.ring.SubmitAndWait(1); err != nil {
			break
		}
		q.ring.ForEachCQE(func(c uring.CQE) {
			if c.UserData&ioTag == 0 {
				return
			}
			e := &q.entries[int(c.UserData&^ioTag)>>segBits]
			e.pending--
			inflight--
			if e.pending == 0 && e.plan != nil {
				q.release(e)
			}
		})
	}
	for i := range q.entries {
		if e := &q.entries[i]; e.plan != nil {
			q.release(e)
		}
	}
}

// release releases e's plan without answering it.
func (q *ringQueue) release(e *ringEnt) {
	if e.plan.Write {
		q.writing--
	}
	e.plan.Release()
	e.plan = nil
}
