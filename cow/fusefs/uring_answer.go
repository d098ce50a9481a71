package fusefs

import (
	"syscall"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// asyncWrite is the WRITE size from which the file is asked to plan a
// write (cow.Volume plans none smaller, and small writes are most of the
// requests), and from which a write it did not plan (the first write to
// blocks after a snapshot, or a file without WritePlanner) goes to another
// goroutine: the engine writes those past the page cache and waits for
// the disk.
const asyncWrite = 256 << 10

// handle answers entry i's request. It returns false when the answer comes
// later, from the ring or another goroutine (finish).
func (q *ringQueue) handle(i int) bool {
	h := (*fuse.InHeader)(unsafe.Pointer(&q.entries[i].hdr[0]))
	if h.Opcode == opPoll {
		q.rs.polls.Add(1)
	}
	if q.writing > 0 && h.Opcode != opRead && h.Opcode != opWrite {
		// Planned writes in flight may hold a lock until this thread
		// completes them (a volume's write barrier), and a snapshot
		// waiting for that lock makes everyone else who wants it wait
		// too: this thread must not be among them. READ and WRITE
		// only use methods that do not wait (ReadAtNoWait, PlanRead,
		// PlanWrite) or go to goroutines; the rest goes to one here.
		q.rs.workers.Add(1)
		go func() {
			defer q.rs.workers.Done()
			if q.answer(i) {
				q.finish(i)
			}
		}()
		return false
	}
	return q.answer(i)
}

// answer answers entry i's request like handle. Only READ and WRITE use
// the ring (those are answered on its thread); requests are answered by
// opcode family: data (READ, WRITE), durability and space (FSYNC,
// FALLOCATE), and metadata (the rest).
func (q *ringQueue) answer(i int) bool {
	e := &q.entries[i]
	h := (*fuse.InHeader)(unsafe.Pointer(&e.hdr[0]))
	if h.NodeId == pollHackIno {
		pollHackReply(e, h)
		return true
	}
	switch h.Opcode {
	case opRead:
		return q.answerRead(i, e)
	case opWrite:
		return q.answerWrite(i, e)
	case opFsync, opFallocate:
		q.answerSync(i, e, h.Opcode)
		return false
	}
	answerMeta(q.rs.rfs, e, h)
	return true
}

// answerRead answers a READ: at once when the file has the data without
// waiting, else through the ring (a plan) or on another goroutine.
func (q *ringQueue) answerRead(i int, e *ringEnt) bool {
	r := q.rs.rfs
	in := inArg[fuse.ReadIn](e)
	if n, st, wait := r.readNoWait(in, e.pay); !wait {
		reply(e, st, n)
		return true
	}
	// From disk: through the ring if the file can plan the read,
	// else another goroutine waits for it.
	if pl, st, ok := r.planRead(in, e.pay); ok {
		if st != fuse.OK {
			reply(e, st, 0)
			return true
		}
		q.startIO(i, pl)
		return false
	}
	// A copy for the goroutine, so that the request itself stays on
	// this thread's stack (no allocation per READ).
	cp := *in
	q.rs.workers.Add(1)
	go func() {
		defer q.rs.workers.Done()
		readInto(r, e, &cp)
		q.finish(i)
	}()
	return false
}

// answerWrite answers a WRITE: large ones through the ring where the file
// plans them, small ones here, the rest on another goroutine.
func (q *ringQueue) answerWrite(i int, e *ringEnt) bool {
	r := q.rs.rfs
	in := inArg[fuse.WriteIn](e)
	if int(in.Size) > e.payloadSize() {
		reply(e, fuse.EINVAL, 0)
		return true
	}
	// Large writes through the ring where the file can plan them
	// (past the page cache, so they wait for the disk without a
	// thread); small ones are not planned, and not asked about.
	if in.Size >= asyncWrite {
		if pl, st, ok := r.planWrite(in, e.pay[:in.Size]); ok {
			if st != fuse.OK {
				reply(e, st, 0)
				return true
			}
			q.startIO(i, pl)
			return false
		}
	}
	// WriteAt may wait for what planned writes in flight hold.
	if in.Size < asyncWrite && q.writing == 0 {
		writeFrom(r, e, in)
		return true
	}
	q.rs.workers.Add(1)
	go func() {
		defer q.rs.workers.Done()
		writeFrom(r, e, in)
		q.finish(i)
	}()
	return false
}

// answerSync answers FSYNC and FALLOCATE on another goroutine: durability
// and hole punching can take milliseconds, and the queue keeps serving.
func (q *ringQueue) answerSync(i int, e *ringEnt, op uint32) {
	r := q.rs.rfs
	var fs *fuse.FsyncIn
	var fa *fuse.FallocateIn
	if op == opFsync {
		fs = inArg[fuse.FsyncIn](e)
	} else {
		fa = inArg[fuse.FallocateIn](e)
	}
	q.rs.workers.Add(1)
	go func() {
		defer q.rs.workers.Done()
		var st fuse.Status
		if fs != nil {
			st = r.Fsync(nil, fs)
		} else {
			st = r.Fallocate(nil, fa)
		}
		reply(e, st, 0)
		q.finish(i)
	}()
}

// answerMeta answers the metadata requests (attributes, lookup, open and
// release, the directory, statfs, the namespace) on the calling thread.
func answerMeta(r *rawFS, e *ringEnt, h *fuse.InHeader) {
	switch h.Opcode {
	case opGetattr:
		var out fuse.AttrOut
		st := r.GetAttr(nil, inArg[fuse.GetAttrIn](e), &out)
		reply(e, st, putOut(e, &out))
	case opSetattr:
		var out fuse.AttrOut
		st := r.SetAttr(nil, inArg[fuse.SetAttrIn](e), &out)
		reply(e, st, putOut(e, &out))
	case opLookup:
		name := lookupName(e)
		if h.NodeId == rootIno && name == pollHackName {
			pollHackReply(e, h)
			break
		}
		var out fuse.EntryOut
		st := r.Lookup(nil, h, name, &out)
		reply(e, st, putOut(e, &out))
	case opOpen, opOpendir:
		in := inArg[fuse.OpenIn](e)
		var out fuse.OpenOut
		var st fuse.Status
		if h.Opcode == opOpen {
			st = r.Open(nil, in, &out)
		} else {
			st = r.OpenDir(nil, in, &out)
		}
		reply(e, st, putOut(e, &out))
	case opRelease:
		r.Release(nil, inArg[fuse.ReleaseIn](e))
		reply(e, fuse.OK, 0)
	case opReleasedir:
		r.ReleaseDir(inArg[fuse.ReleaseIn](e))
		reply(e, fuse.OK, 0)
	case opFlush:
		reply(e, r.Flush(nil, inArg[fuse.FlushIn](e)), 0)
	case opReaddir:
		in := inArg[fuse.ReadIn](e)
		l := fuse.NewDirEntryList(e.pay[:min(int(in.Size), len(e.pay))], in.Offset)
		st := r.ReadDir(nil, in, l)
		reply(e, st, len(l.Bytes()))
	case opStatfs:
		var out fuse.StatfsOut
		st := r.StatFs(nil, h, &out)
		reply(e, st, putOut(e, &out))
	case opSymlink, opMknod, opMkdir, opUnlink, opRmdir, opRename, opLink, opCreate, opRename2, opTmpfile:
		reply(e, fuse.EPERM, 0)
	default:
		// What go-fuse answers for operations the filesystem lacks;
		// the kernel stops sending most of them.
		reply(e, fuse.ENOSYS, 0)
	}
}

// readInto answers a READ with a (blocking) read into the entry's payload.
func readInto(r *rawFS, e *ringEnt, in *fuse.ReadIn) {
	res, st := r.Read(nil, in, e.pay[:min(int(in.Size), len(e.pay))])
	n := 0
	if st == fuse.OK {
		b, _ := res.Bytes(e.pay)
		n = len(b)
		if n > 0 && &b[0] != &e.pay[0] {
			n = copy(e.pay, b)
		}
	}
	reply(e, st, n)
}

// writeFrom answers a WRITE with its data from the entry's payload.
func writeFrom(r *rawFS, e *ringEnt, in *fuse.WriteIn) {
	written, st := r.Write(nil, in, e.pay[:in.Size])
	out := fuse.WriteOut{Size: written}
	reply(e, st, putOut(e, &out))
}

// pollHackReply answers a request for go-fuse's poll-hack file as go-fuse
// does on /dev/fuse (its poll.go): on the ring the requests come here, not
// to go-fuse, and without this pollHack would find no file, the kernel
// would keep sending FUSE_POLL, and the first Go open of a volume file in
// this process would deadlock it (see pollHack).
func pollHackReply(e *ringEnt, h *fuse.InHeader) {
	attr := fuse.Attr{Ino: pollHackIno, Mode: syscall.S_IFREG | 0o644, Nlink: 1}
	switch h.Opcode {
	case opLookup:
		out := fuse.EntryOut{NodeId: pollHackIno, Attr: attr}
		reply(e, fuse.OK, putOut(e, &out))
	case opOpen:
		out := fuse.OpenOut{Fh: pollHackIno}
		reply(e, fuse.OK, putOut(e, &out))
	case opGetattr, opSetattr:
		out := fuse.AttrOut{Attr: attr}
		reply(e, fuse.OK, putOut(e, &out))
	case opPoll:
		reply(e, fuse.ENOSYS, 0) // what the hack is for: no more POLLs
	case opFlush, opRelease:
		reply(e, fuse.OK, 0)
	default:
		// Not ENOSYS: that would turn the operation off for the whole
		// connection.
		reply(e, fuse.Status(syscall.ERANGE), 0)
	}
}
