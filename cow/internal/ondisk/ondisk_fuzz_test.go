package ondisk

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
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
	for _, v := range []uint16{JournalIdentity, JournalDense} {
		t.Run(fmt.Sprint("version", v), func(t *testing.T) { testJournalRoundTrip(t, v) })
	}
}

func testJournalRoundTrip(t *testing.T, version uint16) {
	img := EncodeJournalHeader(JournalHeader{Layer: 9, Version: version})
	want := []Range{{0, 1, 0}, {100, 256, 0}, {1 << 40, 3, 0}}
	if version == JournalDense {
		want = []Range{{0, 1, 7}, {100, 256, LocZero}, {1 << 40, 3, 1 << 33}}
	}
	for _, r := range want {
		img = EncodeRecord(img, r, version)
	}
	img = append(img, make([]byte, 4*RecordSize)...)
	h, got, next, err := DecodeJournal(img)
	if err != nil || h.Layer != 9 || h.Version != version || !reflect.DeepEqual(got, want) || next != int64(JournalHeaderSize+3*RecordSize) {
		t.Fatalf("got %v %v %d %v", h, got, next, err)
	}
	// A record of the other version is damage.
	other := EncodeJournalHeader(JournalHeader{Layer: 9, Version: JournalIdentity + JournalDense - version})
	if _, _, _, err := DecodeJournal(append(other, img[JournalHeaderSize:]...)); !errors.Is(err, ErrCorrupt) && err != nil {
		t.Fatalf("other version: %v", err)
	} else if _, recs, _, _ := DecodeJournal(append(other, img[JournalHeaderSize:]...)); len(recs) != 0 {
		t.Fatalf("other version's header read %d records", len(recs))
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

func TestDenseRecordSplit(t *testing.T) {
	img := EncodeJournalHeader(JournalHeader{Layer: 2, Version: JournalDense})
	img = EncodeRecord(img, Range{Start: 10, Count: 1<<32 + 5, Loc: 100}, JournalDense)
	img = EncodeRecord(img, Range{Start: 1 << 34, Count: 1<<32 + 1, Loc: LocZero}, JournalDense)
	_, got, _, err := DecodeJournal(img)
	want := []Range{{10, 1<<32 - 1, 100}, {10 + 1<<32 - 1, 6, 100 + 1<<32 - 1},
		{1 << 34, 1<<32 - 1, LocZero}, {1<<34 + 1<<32 - 1, 2, LocZero}}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v %v, want %v", got, err, want)
	}
	// A location that wraps is damage.
	bad := EncodeJournalHeader(JournalHeader{Layer: 2, Version: JournalDense})
	bad = EncodeRecord(bad, Range{Start: 1, Count: 4, Loc: LocZero - 2}, JournalDense)
	if _, _, _, err := DecodeJournal(bad); err != nil {
		t.Fatalf("torn tail expected, got %v", err)
	} else if _, recs, _, _ := DecodeJournal(bad); len(recs) != 0 {
		t.Fatalf("wrapping location accepted: %v", recs)
	}
}

func FuzzDecodeJournal(f *testing.F) {
	img := EncodeJournalHeader(JournalHeader{Layer: 1, Version: JournalIdentity})
	img = EncodeRecord(img, Range{Start: 5, Count: 10}, JournalIdentity)
	f.Add(img)
	dense := EncodeJournalHeader(JournalHeader{Layer: 1, Version: JournalDense})
	dense = EncodeRecord(dense, Range{Start: 5, Count: 10, Loc: 3}, JournalDense)
	dense = EncodeRecord(dense, Range{Start: 50, Count: 2, Loc: LocZero}, JournalDense)
	f.Add(dense)
	f.Add(append(img, make([]byte, 64)...))
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
