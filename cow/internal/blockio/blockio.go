// Package blockio holds the types the engine and its kernel frontends share
// for I/O the frontend does itself: the engine resolves a read or a write to
// layer files (cow.Volume.PlanRead, PlanWrite), the frontend submits them
// asynchronously (cow/fusefs over io_uring). It exists so that neither
// imports the other.
package blockio

// Seg is one piece of a plan: len(Buf) bytes of the file Fd at Off. Bytes
// a read segment reads short of its length are past the end of the file
// (an older layer of a volume that grew since) and read as zeros; a write
// segment written short must have its rest written before Commit.
type Seg struct {
	Fd  int
	Off int64
	Buf []byte
	// Flags are the read's RWF_ flags (preadv2; rw_flags of an io_uring
	// read), e.g. RWF_DONTCACHE for a stream.
	Flags int
}

// Plan is a resolved read, or a resolved write (Write). The parts of the
// caller's read buffer that no Seg covers are already filled. The files
// stay open until Release, which must be called exactly once, after the
// last Seg was read or written, or given up.
type Plan struct {
	Segs []Seg
	// N is how many bytes of the buffer the read covers: less than asked
	// at the end of the volume, and then EOF is set. A write covers all N.
	N   int
	EOF bool
	// Write: the Segs are writes of their Buf (cow.Volume.PlanWrite).
	// Commit, called before Release once every Seg was written whole,
	// makes the write count as done (the next flush makes it durable);
	// a write plan released without it failed.
	Write   bool
	Commit  func()
	Release func()
}
