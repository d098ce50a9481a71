package ondisk

import (
	"bytes"
	"encoding/binary"
	"errors"
	"reflect"
	"strings"
	"testing"
)

func sampleOps() []Op {
	return []Op{
		{Kind: OpPutLayer, Layer: &LayerRec{Num: 7, Parent: 3, Size: 1 << 30, Frozen: true}},
		{Kind: OpPutVolume, Volume: &VolumeRec{ID: "vol-1", Size: 1 << 30, Head: 8, SourceSnapshot: "s",
			Labels: map[string]string{"csi.name": "pvc-1", "fs": "ext4"}, Created: 42}},
		{Kind: OpPutSnapshot, Snapshot: &SnapshotRec{ID: "snap-1", VolumeID: "vol-1", Layer: 7, Size: 1 << 30, Created: 43}},
		{Kind: OpDelVolume, ID: "vol-0"},
		{Kind: OpDelSnapshot, ID: "snap-0"},
		{Kind: OpDelLayer, Num: 2},
	}
}

func TestFrameRoundTrip(t *testing.T) {
	ops := sampleOps()
	b := EncodeFrame(FrameTxn, ops)
	kind, got, n, err := DecodeFrame(append(b, make([]byte, 64)...))
	if err != nil || kind != FrameTxn || n != len(b) {
		t.Fatalf("decode: kind %v n %d/%d err %v", kind, n, len(b), err)
	}
	if !reflect.DeepEqual(got, ops) {
		t.Fatalf("round trip mismatch:\n got %+v\nwant %+v", got, ops)
	}
	// Every single-byte corruption is detected.
	for i := range b {
		c := bytes.Clone(b)
		c[i] ^= 0x40
		if _, _, _, err := DecodeFrame(c); err == nil {
			t.Fatalf("corruption at byte %d not detected", i)
		}
	}
	if _, _, _, err := DecodeFrame(make([]byte, 100)); !errors.Is(err, ErrEnd) {
		t.Fatalf("zero tail: got %v, want ErrEnd", err)
	}
}

func TestJournalRoundTrip(t *testing.T) {
	img := EncodeJournalHeader(JournalHeader{Layer: 9})
	want := []Range{{0, 1, 7}, {100, 256, LocZero}, {1 << 40, 3, 1 << 33}}
	for _, r := range want {
		img = EncodeRecord(img, r)
	}
	img = append(img, make([]byte, 4*RecordSize)...)
	h, got, next, err := DecodeJournal(img)
	if err != nil || h.Layer != 9 || le.Uint16(img[4:]) != JournalVersion || !reflect.DeepEqual(got, want) || next != int64(JournalHeaderSize+3*RecordSize) {
		t.Fatalf("got %v %v %d %v", h, got, next, err)
	}
	// A record of the identity layout (magic "CWR1", checksummed) is damage.
	v1 := bytes.Clone(img[:JournalHeaderSize])
	v1 = append(v1, identityRecord(5, 10)...)
	v1 = append(v1, make([]byte, RecordSize)...)
	if _, recs, _, err := DecodeJournal(v1); err != nil || len(recs) != 0 {
		t.Fatalf("identity record: %v %v", recs, err)
	}
	if HasValidRecord(v1) {
		t.Fatal("identity record counted as valid")
	}
	// A torn last record is dropped; the write position points at it.
	torn := bytes.Clone(img)
	torn[JournalHeaderSize+2*RecordSize+10] ^= 1
	_, got, next, err = DecodeJournal(torn)
	if err != nil || len(got) != 2 || next != int64(JournalHeaderSize+2*RecordSize) {
		t.Fatalf("torn tail: %v %d %v", got, next, err)
	}
	// Damage before a valid record is corruption, not a torn tail.
	mid := bytes.Clone(img)
	mid[JournalHeaderSize+10] ^= 1
	if _, _, _, err := DecodeJournal(mid); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("mid damage: got %v, want ErrCorrupt", err)
	}
}

// identityHeader and identityRecord build, by hand, a journal header and a
// record of version 1 (the identity layout), which this package no longer
// writes.
func identityHeader(layer uint32) []byte {
	b := make([]byte, JournalHeaderSize)
	binary.LittleEndian.PutUint32(b[0:], 0x314d5743) // "CWM1"
	binary.LittleEndian.PutUint16(b[4:], 1)
	binary.LittleEndian.PutUint32(b[8:], layer)
	binary.LittleEndian.PutUint32(b[28:], Checksum(b[:28]))
	return b
}

func identityRecord(start, count uint64) []byte {
	b := make([]byte, RecordSize)
	binary.LittleEndian.PutUint32(b[0:], 0x31525743) // "CWR1"
	binary.LittleEndian.PutUint64(b[8:], start)
	binary.LittleEndian.PutUint64(b[16:], count)
	binary.LittleEndian.PutUint32(b[24:], Checksum(b[:24]))
	return b
}

// TestIdentityJournalRefused: a journal of version 1 is refused with
// ErrIdentityJournal (an ErrVersion), with or without records.
func TestIdentityJournalRefused(t *testing.T) {
	img := identityHeader(4)
	if _, err := DecodeJournalHeader(img); !errors.Is(err, ErrIdentityJournal) || !errors.Is(err, ErrVersion) {
		t.Fatalf("header: got %v, want ErrIdentityJournal", err)
	}
	img = append(img, identityRecord(5, 10)...)
	img = append(img, make([]byte, RecordSize)...)
	if _, _, _, err := DecodeJournal(img); !errors.Is(err, ErrIdentityJournal) {
		t.Fatalf("journal: got %v, want ErrIdentityJournal", err)
	}
	if !strings.Contains(ErrIdentityJournal.Error(), "no longer supported") {
		t.Fatalf("message %q", ErrIdentityJournal)
	}
	// Any other unknown version is an ErrVersion, not this one.
	other := identityHeader(4)
	binary.LittleEndian.PutUint16(other[4:], 3)
	binary.LittleEndian.PutUint32(other[28:], Checksum(other[:28]))
	if _, err := DecodeJournalHeader(other); !errors.Is(err, ErrVersion) || errors.Is(err, ErrIdentityJournal) {
		t.Fatalf("version 3: got %v", err)
	}
}

func FuzzDecodeFrame(f *testing.F) {
	f.Add(EncodeFrame(FrameTxn, sampleOps()))
	f.Add(EncodeFrame(FrameCheckpoint, nil))
	f.Add([]byte{})
	f.Add(make([]byte, 32))
	f.Fuzz(func(t *testing.T, b []byte) {
		kind, ops, n, err := DecodeFrame(b)
		if err != nil {
			return
		}
		if n > len(b) {
			t.Fatalf("length %d beyond input %d", n, len(b))
		}
		// Whatever decodes must re-encode to the same bytes (canonical form).
		if again := EncodeFrame(kind, ops); !bytes.Equal(again, b[:n]) {
			// Labels with duplicate keys decode to fewer entries; that is the
			// only non-canonical case and must still decode the same way.
			k2, ops2, _, err := DecodeFrame(again)
			if err != nil || k2 != kind || !reflect.DeepEqual(ops2, ops) {
				t.Fatalf("re-encode differs and does not round trip: %v", err)
			}
		}
	})
}

func TestRecordSplit(t *testing.T) {
	img := EncodeJournalHeader(JournalHeader{Layer: 2})
	img = EncodeRecord(img, Range{Start: 10, Count: 1<<32 + 5, Loc: 100})
	img = EncodeRecord(img, Range{Start: 1 << 34, Count: 1<<32 + 1, Loc: LocZero})
	_, got, _, err := DecodeJournal(img)
	want := []Range{{10, 1<<32 - 1, 100}, {10 + 1<<32 - 1, 6, 100 + 1<<32 - 1},
		{1 << 34, 1<<32 - 1, LocZero}, {1<<34 + 1<<32 - 1, 2, LocZero}}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v %v, want %v", got, err, want)
	}
	// A location that wraps is damage.
	bad := EncodeJournalHeader(JournalHeader{Layer: 2})
	bad = EncodeRecord(bad, Range{Start: 1, Count: 4, Loc: LocZero - 2})
	if _, _, _, err := DecodeJournal(bad); err != nil {
		t.Fatalf("torn tail expected, got %v", err)
	} else if _, recs, _, _ := DecodeJournal(bad); len(recs) != 0 {
		t.Fatalf("wrapping location accepted: %v", recs)
	}
}

func FuzzDecodeJournal(f *testing.F) {
	img := EncodeJournalHeader(JournalHeader{Layer: 1})
	img = EncodeRecord(img, Range{Start: 5, Count: 10, Loc: 3})
	img = EncodeRecord(img, Range{Start: 50, Count: 2, Loc: LocZero})
	f.Add(img)
	f.Add(append(img, make([]byte, 64)...))
	f.Add(append(identityHeader(1), identityRecord(5, 10)...))
	f.Add([]byte("CWM1"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, ranges, next, err := DecodeJournal(b)
		if err != nil {
			return
		}
		if next < JournalHeaderSize || next > int64(len(b)) {
			t.Fatalf("next offset %d out of [%d,%d]", next, JournalHeaderSize, len(b))
		}
		for _, r := range ranges {
			if r.Count == 0 || r.End() < r.Start || (r.Loc != LocZero && r.Loc+r.Count < r.Loc) {
				t.Fatalf("invalid range %+v accepted", r)
			}
		}
	})
}
