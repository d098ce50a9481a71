package ondisk

import (
	"errors"
	"fmt"
)

// The extent-map journal of one layer: a header, then fixed-size records
// "blocks [Start, Start+Count) are owned by this layer". Ownership within a
// layer only ever grows (a discard owns the block and punches a hole in the
// data file), so the journal is append-only. The file is preallocated with
// zeros; replay stops at the first all-zero record. A torn or damaged last
// record is an unacknowledged flush and is dropped.
//
// Blocks are appended to the layer's data file, and each record also says
// where (Loc: the file block of the range's first block, the others
// following it, or LocZero for blocks that read as zeros and have no data);
// a later record for a block replaces an earlier one's location, so replay
// goes in order. This is journal version 2; version 1, the identity layout
// of pre-release builds (block b at byte b*BlockSize of a sparse file), is
// refused with ErrIdentityJournal.

const (
	journalMagic = 0x314d5743 // "CWM1"
	recordMagic  = 0x32525743 // "CWR2"
	// JournalVersion is the journal version this build reads and writes.
	JournalVersion = 2
	// journalIdentity is the version of the identity layout, refused.
	journalIdentity = 1
	// LocZero is the location of blocks that read as zeros (a discard).
	LocZero = ^uint64(0)
	// JournalHeaderSize and RecordSize are the fixed sizes of the header and of
	// one record. Both are 32 so records stay aligned.
	JournalHeaderSize = 32
	RecordSize        = 32
)

// ErrIdentityJournal reports a journal of version 1, the identity layout.
// It wraps ErrVersion.
var ErrIdentityJournal = fmt.Errorf("%w: journal version 1: the identity-layout layer format of pre-release builds is no longer supported", ErrVersion)

// JournalHeader identifies a layer's journal.
type JournalHeader struct {
	Layer uint32
}

// EncodeJournalHeader returns the 32-byte header.
func EncodeJournalHeader(h JournalHeader) []byte {
	b := make([]byte, JournalHeaderSize)
	le.PutUint32(b[0:], journalMagic)
	le.PutUint16(b[4:], JournalVersion)
	le.PutUint32(b[8:], h.Layer)
	le.PutUint32(b[28:], Checksum(b[:28]))
	return b
}

// DecodeJournalHeader validates and decodes a header.
func DecodeJournalHeader(b []byte) (JournalHeader, error) {
	if len(b) < JournalHeaderSize {
		return JournalHeader{}, corrupt("journal header: %d bytes", len(b))
	}
	if le.Uint32(b[0:]) != journalMagic {
		return JournalHeader{}, corrupt("journal header: bad magic")
	}
	if Checksum(b[:28]) != le.Uint32(b[28:]) {
		return JournalHeader{}, corrupt("journal header: bad checksum")
	}
	switch v := le.Uint16(b[4:]); v {
	case JournalVersion:
	case journalIdentity:
		return JournalHeader{}, ErrIdentityJournal
	default:
		return JournalHeader{}, fmt.Errorf("%w: journal version %d", ErrVersion, v)
	}
	return JournalHeader{Layer: le.Uint32(b[8:])}, nil
}

// Range is a run of blocks. Loc is where the layer's data file keeps them
// (see above).
type Range struct {
	Start uint64
	Count uint64
	Loc   uint64
}

// End is the first block after the range.
func (r Range) End() uint64 { return r.Start + r.Count }

// maxRecordCount is the most blocks one record holds (its count is 32
// bits); EncodeRecord splits longer ranges.
const maxRecordCount = 1<<32 - 1

// EncodeRecord appends the records for r to dst: one 32-byte record, or
// several for a range longer than a record holds.
func EncodeRecord(dst []byte, r Range) []byte {
	var b [RecordSize]byte
	for r.Count > 0 {
		n := min(r.Count, maxRecordCount)
		le.PutUint32(b[0:], recordMagic)
		le.PutUint32(b[4:], uint32(n))
		le.PutUint64(b[8:], r.Start)
		le.PutUint64(b[16:], r.Loc)
		le.PutUint32(b[24:], Checksum(b[:24]))
		dst = append(dst, b[:]...)
		r.Start += n
		r.Count -= n
		if r.Loc != LocZero {
			r.Loc += n
		}
	}
	return dst
}

// DecodeRecord decodes one record. It returns ErrEnd for an all-zero record
// (the unwritten, preallocated tail) and ErrCorrupt for anything damaged.
func DecodeRecord(b []byte) (Range, error) {
	if len(b) < RecordSize {
		return Range{}, corrupt("record: %d bytes", len(b))
	}
	b = b[:RecordSize]
	if allZero(b) {
		return Range{}, ErrEnd
	}
	if le.Uint32(b[0:]) != recordMagic || Checksum(b[:24]) != le.Uint32(b[24:]) {
		return Range{}, corrupt("record: bad magic or checksum")
	}
	r := Range{Start: le.Uint64(b[8:]), Count: uint64(le.Uint32(b[4:])), Loc: le.Uint64(b[16:])}
	if r.Loc != LocZero && r.Loc+r.Count < r.Loc {
		return Range{}, corrupt("record: bad location %d+%d", r.Loc, r.Count)
	}
	if r.Count == 0 || r.End() < r.Start {
		return Range{}, corrupt("record: bad range %d+%d", r.Start, r.Count)
	}
	return r, nil
}

// DecodeJournal decodes a whole journal file image. It returns the header, the
// records, and the byte offset where the next record should be written. A
// damaged record is treated as the torn end of the journal only if everything
// after it is zero or also damaged in its last record position; a damaged
// record followed by valid ones is corruption.
func DecodeJournal(b []byte) (JournalHeader, []Range, int64, error) {
	h, err := DecodeJournalHeader(b)
	if err != nil {
		return h, nil, 0, err
	}
	var out []Range
	off := JournalHeaderSize
	for off+RecordSize <= len(b) {
		r, err := DecodeRecord(b[off:])
		if errors.Is(err, ErrEnd) {
			break
		}
		if err != nil {
			// A torn write can only damage the last record written: if any
			// valid record follows, the damage is not a torn tail.
			for next := off + RecordSize; next+RecordSize <= len(b); next += RecordSize {
				if _, err2 := DecodeRecord(b[next:]); err2 == nil {
					return h, nil, 0, corrupt("journal: damaged record at %d before valid records", off)
				}
			}
			break
		}
		out = append(out, r)
		off += RecordSize
	}
	return h, out, int64(off), nil
}

// HasValidRecord reports whether any valid record appears in a journal
// image at a record position, whatever state the header is in.
func HasValidRecord(b []byte) bool {
	for off := JournalHeaderSize; off+RecordSize <= len(b); off += RecordSize {
		if _, err := DecodeRecord(b[off:]); err == nil {
			return true
		}
	}
	return false
}
