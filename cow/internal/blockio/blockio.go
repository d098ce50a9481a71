// Package blockio holds the types the engine and its kernel frontends share
// for reads the frontend does itself: the engine resolves a read to layer
// files (cow.Volume.PlanRead), the frontend reads them asynchronously
// (cow/fusefs over io_uring). It exists so that neither imports the other.
package blockio

// Seg is one piece of a planned read: len(Buf) bytes of the file Fd at Off.
// Bytes a segment reads short of its length are past the end of the file
// (an older layer of a volume that grew since) and read as zeros.
type Seg struct {
	Fd  int
	Off int64
	Buf []byte
	// Flags are the read's RWF_ flags (preadv2; rw_flags of an io_uring
	// read), e.g. RWF_DONTCACHE for a stream.
	Flags int
}

// Plan is a resolved read. The parts of the caller's buffer that no Seg
// covers are already filled. The files stay open until Release, which must
// be called exactly once, after the last Seg was read or given up.
type Plan struct {
	Segs []Seg
	// N is how many bytes of the buffer the read covers: less than asked
	// at the end of the volume, and then EOF is set.
	N       int
	EOF     bool
	Release func()
}
