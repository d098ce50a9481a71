package cow_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/cowcsi/cowcsi/cow"
)

// The randomized model test drives a store with a random sequence of
// operations and checks every observable result against a plain in-memory
// model: a byte slice per volume and per snapshot.

// modelSnap is a snapshot in the model.
type modelSnap struct {
	id      string
	volID   string
	data    []byte
	labels  map[string]string
	lineage []*modelSnap // older snapshots below it in its chain, oldest first
	deleted bool
}

// modelVol is a volume in the model.
type modelVol struct {
	id      string
	data    []byte
	srcSnap string
	srcVol  string
	labels  map[string]string
	lineage []*modelSnap // snapshots below the volume's head, oldest first
}

type modelTest struct {
	t      *testing.T
	ctx    context.Context
	rng    *rand.Rand
	opts   cow.Options
	s      *cow.Store
	vols   map[string]*modelVol
	snaps  map[string]*modelSnap
	open   map[string]*cow.Volume
	nextID int
	freed  []string // deleted IDs, reused now and then to catch stale state
	step   int
	trail  []string // recent operations, printed on failure
}

const (
	modelMaxVols  = 8
	modelMaxSnaps = 12
)

func TestModelRandomized(t *testing.T) {
	seed := testSeed(t)
	steps := scaled(1000)
	if *flagSteps > 0 {
		steps = *flagSteps
	}
	rng := rand.New(rand.NewSource(seed))
	m := &modelTest{
		t:     t,
		ctx:   t.Context(),
		rng:   rng,
		opts:  cow.Options{NoBackgroundMerge: rng.Intn(2) == 0},
		vols:  map[string]*modelVol{},
		snaps: map[string]*modelSnap{},
		open:  map[string]*cow.Volume{},
	}
	t.Logf("options %+v, %d steps", m.opts, steps)
	m.s = openStoreOpts(t, fastTempDir(t), m.opts)
	t.Cleanup(m.closeAll)

	ops := []struct {
		name   string
		weight int
		fn     func()
	}{
		{"write", 30, m.opWrite},
		{"read", 14, m.opRead},
		{"discard", 6, m.opDiscard},
		{"flush", 4, m.opFlush},
		{"snapshot", 6, m.opSnapshot},
		{"snapshotGroup", 2, m.opSnapshotGroup},
		{"restore", 4, m.opRestore},
		{"clone", 3, m.opClone},
		{"deleteVolume", 3, m.opDeleteVolume},
		{"deleteSnapshot", 4, m.opDeleteSnapshot},
		{"expand", 3, m.opExpand},
		{"closeVolume", 3, m.opCloseVolume},
		{"reopenStore", 1, m.opReopenStore},
		{"list", 2, m.opList},
		{"usage", 2, m.opUsage},
		{"changedExtents", 3, m.opChanged},
		{"allocatedExtents", 2, m.opAllocated},
		{"verifyVolume", 2, m.opVerifyVolume},
		{"verifySnapshot", 2, m.opVerifySnapshot},
	}
	total := 0
	for _, op := range ops {
		total += op.weight
	}
	for m.step = 0; m.step < steps; m.step++ {
		r := rng.Intn(total)
		for _, op := range ops {
			if r < op.weight {
				op.fn()
				break
			}
			r -= op.weight
		}
		if t.Failed() {
			m.fatalf("stopping after the first failure")
		}
	}
	m.verifyEverything()
	m.opReopenStore()
	m.verifyEverything()
}

// logf records an operation in the trail printed on failure.
func (m *modelTest) logf(format string, args ...any) {
	m.trail = append(m.trail, fmt.Sprintf("step %d: ", m.step)+fmt.Sprintf(format, args...))
	if len(m.trail) > 30 {
		m.trail = m.trail[1:]
	}
}

func (m *modelTest) fatalf(format string, args ...any) {
	m.t.Helper()
	m.t.Fatalf("step %d: %s\nrecent operations:\n  %s", m.step, fmt.Sprintf(format, args...), strings.Join(m.trail, "\n  "))
}

func (m *modelTest) check() {
	m.t.Helper()
	if err := m.s.Check(); err != nil {
		m.fatalf("Check: %v", err)
	}
}

func (m *modelTest) closeAll() {
	for id, v := range m.open {
		if err := v.Close(); err != nil && !errors.Is(err, cow.ErrClosed) {
			m.t.Errorf("Close(%s): %v", id, err)
		}
		delete(m.open, id)
	}
}

// newID returns an unused ID, now and then reusing a deleted one.
func (m *modelTest) newID(prefix string) string {
	if len(m.freed) > 0 && m.rng.Intn(4) == 0 {
		i := m.rng.Intn(len(m.freed))
		id := m.freed[i]
		m.freed = slices.Delete(m.freed, i, i+1)
		if m.vols[id] == nil && m.snaps[id] == nil {
			return id
		}
	}
	m.nextID++
	return fmt.Sprintf("%s%d", prefix, m.nextID)
}

func (m *modelTest) pickVol() *modelVol {
	if len(m.vols) == 0 {
		return m.createVolume()
	}
	ids := slices.Sorted(maps.Keys(m.vols))
	return m.vols[ids[m.rng.Intn(len(ids))]]
}

// liveSnaps returns the snapshots that exist, sorted by ID.
func (m *modelTest) liveSnaps() []*modelSnap {
	var out []*modelSnap
	for _, id := range slices.Sorted(maps.Keys(m.snaps)) {
		out = append(out, m.snaps[id])
	}
	return out
}

func (m *modelTest) pickSnap() *modelSnap {
	snaps := m.liveSnaps()
	if len(snaps) == 0 {
		return nil
	}
	return snaps[m.rng.Intn(len(snaps))]
}

// handle returns an open handle for the volume, opening it if needed.
func (m *modelTest) handle(mv *modelVol) *cow.Volume {
	if v := m.open[mv.id]; v != nil {
		return v
	}
	v, err := m.s.OpenVolume(m.ctx, mv.id)
	if err != nil {
		m.fatalf("OpenVolume(%s): %v", mv.id, err)
	}
	if v.ID() != mv.id || v.Size() != int64(len(mv.data)) {
		m.fatalf("OpenVolume(%s): handle ID %q size %d, want size %d", mv.id, v.ID(), v.Size(), len(mv.data))
	}
	if _, err := m.s.OpenVolume(m.ctx, mv.id); !errors.Is(err, cow.ErrInUse) {
		m.fatalf("second OpenVolume(%s): %v, want ErrInUse", mv.id, err)
	}
	m.open[mv.id] = v
	return v
}

// randSize returns a volume size, mostly 64 KiB to 512 KiB, now and then up to
// 4 MiB, and now and then not a multiple of the block size.
func (m *modelTest) randSize() int64 {
	var n int64
	switch m.rng.Intn(8) {
	case 0:
		n = 1<<20 + m.rng.Int63n(3<<20)
	default:
		n = 64<<10 + m.rng.Int63n(448<<10)
	}
	if m.rng.Intn(3) != 0 {
		n = roundUp(n)
	}
	return n
}

// randRange returns a range inside [0, size): small, around a block, or large,
// aligned or not, often spanning block boundaries.
func (m *modelTest) randRange(size int64) (off, n int64) {
	switch m.rng.Intn(4) {
	case 0:
		n = 1 + m.rng.Int63n(512)
	case 1:
		n = 1 + m.rng.Int63n(3*cow.BlockSize)
	case 2:
		n = cow.BlockSize * (1 + m.rng.Int63n(4))
	default:
		n = 1 + m.rng.Int63n(64<<10)
	}
	n = min(n, size)
	off = m.rng.Int63n(size - n + 1)
	if m.rng.Intn(3) == 0 {
		off = off / cow.BlockSize * cow.BlockSize
	}
	if m.rng.Intn(8) == 0 { // straddle a block boundary by a few bytes
		b := m.rng.Int63n(size/cow.BlockSize) * cow.BlockSize
		off = max(0, b-m.rng.Int63n(16))
		n = min(n, size-off)
	}
	return off, n
}

func (m *modelTest) createVolume() *modelVol {
	id := m.newID("v")
	size := m.randSize()
	labels := map[string]string{"step": fmt.Sprint(m.step)}
	info, err := m.s.CreateVolume(m.ctx, cow.VolumeSpec{ID: id, Size: size, Labels: labels})
	m.logf("CreateVolume %s size %d", id, size)
	if err != nil {
		m.fatalf("CreateVolume(%s, %d): %v", id, size, err)
	}
	if info.ID != id || info.Size != roundUp(size) || !maps.Equal(info.Labels, labels) {
		m.fatalf("CreateVolume(%s, %d) = %+v, want size %d and labels %v", id, size, info, roundUp(size), labels)
	}
	mv := &modelVol{id: id, data: make([]byte, info.Size), labels: labels}
	m.vols[id] = mv
	return mv
}

func (m *modelTest) opWrite() {
	mv := m.pickVol()
	v := m.handle(mv)
	off, n := m.randRange(int64(len(mv.data)))
	p := make([]byte, n)
	if m.rng.Intn(10) != 0 { // one write in ten writes zeros
		m.rng.Read(p)
	}
	m.logf("WriteAt %s off %d len %d", mv.id, off, n)
	got, err := v.WriteAt(p, off)
	if err != nil || got != int(n) {
		m.fatalf("WriteAt(%s, off %d, len %d) = %d, %v", mv.id, off, n, got, err)
	}
	copy(mv.data[off:], p)
}

func (m *modelTest) opRead() {
	mv := m.pickVol()
	v := m.handle(mv)
	size := int64(len(mv.data))
	off, n := m.randRange(size)
	if m.rng.Intn(6) == 0 { // read across the end or from the end
		off = size - m.rng.Int63n(min(size, 2*cow.BlockSize)+1)
		n = 1 + m.rng.Int63n(3*cow.BlockSize)
	}
	p := make([]byte, n)
	got, err := v.ReadAt(p, off)
	want := min(n, size-off)
	switch {
	case want < n && (got != int(want) || err != io.EOF):
		m.fatalf("ReadAt(%s, off %d, len %d) at size %d = %d, %v; want %d, io.EOF", mv.id, off, n, size, got, err, want)
	case want == n && (got != int(n) || (err != nil && !(err == io.EOF && off+n == size))):
		m.fatalf("ReadAt(%s, off %d, len %d) at size %d = %d, %v; want %d, nil", mv.id, off, n, size, got, err, n)
	}
	if d := diffAt(p[:want], mv.data[off:off+want]); d != "" {
		m.fatalf("ReadAt(%s, off %d, len %d): %s", mv.id, off, n, d)
	}
}

func (m *modelTest) opDiscard() {
	mv := m.pickVol()
	v := m.handle(mv)
	off, n := m.randRange(int64(len(mv.data)))
	var err error
	if m.rng.Intn(2) == 0 {
		m.logf("Discard %s off %d len %d", mv.id, off, n)
		err = v.Discard(off, n)
	} else {
		m.logf("WriteZeroes %s off %d len %d", mv.id, off, n)
		err = v.WriteZeroes(off, n)
	}
	if err != nil {
		m.fatalf("Discard/WriteZeroes(%s, off %d, len %d): %v", mv.id, off, n, err)
	}
	clear(mv.data[off : off+n])
}

func (m *modelTest) opFlush() {
	mv := m.pickVol()
	m.logf("Flush %s", mv.id)
	if err := m.handle(mv).Flush(); err != nil {
		m.fatalf("Flush(%s): %v", mv.id, err)
	}
}

func (m *modelTest) opSnapshot() {
	if len(m.snaps) >= modelMaxSnaps {
		m.opDeleteSnapshot()
		return
	}
	mv := m.pickVol()
	if m.rng.Intn(2) == 0 {
		m.handle(mv) // snapshot while the volume is open (and maybe has unflushed writes)
	}
	id := m.newID("s")
	labels := map[string]string{"k": id}
	m.logf("CreateSnapshot %s of %s (open %v)", id, mv.id, m.open[mv.id] != nil)
	info, err := m.s.CreateSnapshot(m.ctx, cow.SnapshotSpec{ID: id, VolumeID: mv.id, Labels: labels})
	if err != nil {
		m.fatalf("CreateSnapshot(%s of %s): %v", id, mv.id, err)
	}
	if info.ID != id || info.VolumeID != mv.id || info.Size != int64(len(mv.data)) || !maps.Equal(info.Labels, labels) {
		m.fatalf("CreateSnapshot(%s of %s) = %+v, want size %d", id, mv.id, info, len(mv.data))
	}
	if _, err := m.s.CreateSnapshot(m.ctx, cow.SnapshotSpec{ID: id, VolumeID: mv.id}); !errors.Is(err, cow.ErrExists) {
		m.fatalf("CreateSnapshot(%s) again: %v, want ErrExists", id, err)
	}
	ms := &modelSnap{id: id, volID: mv.id, data: bytes.Clone(mv.data), labels: labels, lineage: slices.Clone(mv.lineage)}
	mv.lineage = append(mv.lineage, ms)
	m.snaps[id] = ms
}

// opSnapshotGroup snapshots several volumes at one instant.
func (m *modelTest) opSnapshotGroup() {
	var vols []*modelVol
	for _, id := range slices.Sorted(maps.Keys(m.vols)) {
		if m.rng.Intn(2) == 0 {
			vols = append(vols, m.vols[id])
		}
	}
	if len(vols) == 0 || len(m.snaps)+len(vols) > modelMaxSnaps {
		m.opDeleteSnapshot()
		return
	}
	var specs []cow.SnapshotSpec
	for _, mv := range vols {
		if m.rng.Intn(2) == 0 {
			m.handle(mv)
		}
		specs = append(specs, cow.SnapshotSpec{ID: m.newID("g"), VolumeID: mv.id, Labels: map[string]string{"group": "yes"}})
	}
	m.logf("CreateSnapshotGroup %v", specs)
	infos, err := m.s.CreateSnapshotGroup(m.ctx, specs)
	if err != nil || len(infos) != len(specs) {
		m.fatalf("CreateSnapshotGroup(%v) = %v, %v", specs, infos, err)
	}
	for i, mv := range vols {
		if infos[i].ID != specs[i].ID || infos[i].VolumeID != mv.id || infos[i].Size != int64(len(mv.data)) {
			m.fatalf("CreateSnapshotGroup result %d = %+v, want %s of %s size %d", i, infos[i], specs[i].ID, mv.id, len(mv.data))
		}
		ms := &modelSnap{id: specs[i].ID, volID: mv.id, data: bytes.Clone(mv.data), labels: specs[i].Labels, lineage: slices.Clone(mv.lineage)}
		mv.lineage = append(mv.lineage, ms)
		m.snaps[ms.id] = ms
	}
}

func (m *modelTest) opRestore() {
	ms := m.pickSnap()
	if ms == nil || len(m.vols) >= modelMaxVols {
		m.opSnapshot()
		return
	}
	id := m.newID("r")
	size := int64(len(ms.data))
	if m.rng.Intn(2) == 0 {
		size += m.rng.Int63n(256 << 10)
	}
	m.logf("CreateVolume %s from snapshot %s size %d", id, ms.id, size)
	info, err := m.s.CreateVolume(m.ctx, cow.VolumeSpec{ID: id, Size: size, SourceSnapshot: ms.id})
	if err != nil {
		m.fatalf("CreateVolume(%s from snapshot %s, size %d): %v", id, ms.id, size, err)
	}
	if info.Size != roundUp(size) || info.SourceSnapshot != ms.id || info.SourceVolume != "" {
		m.fatalf("CreateVolume(%s from snapshot %s) = %+v, want size %d", id, ms.id, info, roundUp(size))
	}
	data := make([]byte, info.Size)
	copy(data, ms.data)
	mv := &modelVol{id: id, data: data, srcSnap: ms.id, lineage: append(slices.Clone(ms.lineage), ms)}
	m.vols[id] = mv
	if m.rng.Intn(2) == 0 {
		m.verifyVolume(mv)
	}
}

func (m *modelTest) opClone() {
	if len(m.vols) >= modelMaxVols {
		m.opDeleteVolume()
		return
	}
	src := m.pickVol()
	if m.rng.Intn(2) == 0 {
		m.handle(src) // clone of a volume that is open
	}
	id := m.newID("c")
	size := int64(len(src.data))
	if m.rng.Intn(3) == 0 {
		size += m.rng.Int63n(256 << 10)
	}
	m.logf("CreateVolume %s from volume %s size %d (open %v)", id, src.id, size, m.open[src.id] != nil)
	info, err := m.s.CreateVolume(m.ctx, cow.VolumeSpec{ID: id, Size: size, SourceVolume: src.id})
	if err != nil {
		m.fatalf("CreateVolume(%s from volume %s, size %d): %v", id, src.id, size, err)
	}
	if info.Size != roundUp(size) || info.SourceVolume != src.id || info.SourceSnapshot != "" {
		m.fatalf("CreateVolume(%s from volume %s) = %+v, want size %d", id, src.id, info, roundUp(size))
	}
	data := make([]byte, info.Size)
	copy(data, src.data)
	mv := &modelVol{id: id, data: data, srcVol: src.id, lineage: slices.Clone(src.lineage)}
	m.vols[id] = mv
	if m.rng.Intn(2) == 0 {
		m.verifyVolume(mv)
	}
}

func (m *modelTest) opDeleteVolume() {
	if len(m.vols) == 0 {
		return
	}
	mv := m.pickVol()
	if v := m.open[mv.id]; v != nil {
		if err := m.s.DeleteVolume(m.ctx, mv.id); !errors.Is(err, cow.ErrInUse) {
			m.fatalf("DeleteVolume(%s) while open: %v, want ErrInUse", mv.id, err)
		}
		m.closeVolume(mv.id)
	}
	m.logf("DeleteVolume %s", mv.id)
	if err := m.s.DeleteVolume(m.ctx, mv.id); err != nil {
		m.fatalf("DeleteVolume(%s): %v", mv.id, err)
	}
	for _, err := range []error{
		m.s.DeleteVolume(m.ctx, mv.id),
		func() error { _, err := m.s.GetVolume(mv.id); return err }(),
		func() error { _, err := m.s.OpenVolume(m.ctx, mv.id); return err }(),
	} {
		if !errors.Is(err, cow.ErrNotFound) {
			m.fatalf("after DeleteVolume(%s): %v, want ErrNotFound", mv.id, err)
		}
	}
	delete(m.vols, mv.id)
	m.freed = append(m.freed, mv.id)
}

func (m *modelTest) opDeleteSnapshot() {
	ms := m.pickSnap()
	if ms == nil {
		return
	}
	m.logf("DeleteSnapshot %s", ms.id)
	if err := m.s.DeleteSnapshot(m.ctx, ms.id); err != nil {
		m.fatalf("DeleteSnapshot(%s): %v", ms.id, err)
	}
	if _, err := m.s.GetSnapshot(ms.id); !errors.Is(err, cow.ErrNotFound) {
		m.fatalf("GetSnapshot(%s) after delete: %v, want ErrNotFound", ms.id, err)
	}
	if err := m.s.DeleteSnapshot(m.ctx, ms.id); !errors.Is(err, cow.ErrNotFound) {
		m.fatalf("DeleteSnapshot(%s) again: %v, want ErrNotFound", ms.id, err)
	}
	ms.deleted = true
	ms.data = nil // lineages keep the pointer, not the contents
	delete(m.snaps, ms.id)
	m.freed = append(m.freed, ms.id)
	if m.rng.Intn(2) != 0 {
		return
	}
	// Let the merge of the deleted layer run, then check what depended on it.
	if err := m.s.WaitIdle(m.ctx); err != nil {
		m.fatalf("WaitIdle: %v", err)
	}
	for _, id := range slices.Sorted(maps.Keys(m.vols)) {
		if mv := m.vols[id]; slices.Contains(mv.lineage, ms) {
			m.verifyVolume(mv)
		}
	}
	for _, other := range m.liveSnaps() {
		if slices.Contains(other.lineage, ms) {
			m.verifySnapshot(other)
		}
	}
}

func (m *modelTest) opExpand() {
	mv := m.pickVol()
	if m.rng.Intn(2) == 0 {
		m.handle(mv)
	}
	size := int64(len(mv.data))
	if m.rng.Intn(4) == 0 {
		smaller := size - cow.BlockSize*(1+m.rng.Int63n(size/cow.BlockSize-1))
		if _, err := m.s.ExpandVolume(m.ctx, mv.id, smaller); !errors.Is(err, cow.ErrInvalid) {
			m.fatalf("ExpandVolume(%s, %d) shrinking from %d: %v, want ErrInvalid", mv.id, smaller, size, err)
		}
		if info, err := m.s.ExpandVolume(m.ctx, mv.id, size); err != nil || info.Size != size {
			m.fatalf("ExpandVolume(%s) to its own size %d = %+v, %v; want no-op", mv.id, size, info, err)
		}
	}
	if size >= 4<<20 { // keep volumes small: the test is about chains, not bulk
		return
	}
	newSize := size + 1 + m.rng.Int63n(512<<10)
	m.logf("ExpandVolume %s %d -> %d (open %v)", mv.id, size, newSize, m.open[mv.id] != nil)
	info, err := m.s.ExpandVolume(m.ctx, mv.id, newSize)
	if err != nil || info.Size != roundUp(newSize) {
		m.fatalf("ExpandVolume(%s, %d) = %+v, %v; want size %d", mv.id, newSize, info, err, roundUp(newSize))
	}
	if v := m.open[mv.id]; v != nil && v.Size() != info.Size {
		m.fatalf("open handle of %s: Size() = %d after expand to %d", mv.id, v.Size(), info.Size)
	}
	mv.data = append(mv.data, make([]byte, info.Size-size)...)
	if m.rng.Intn(3) == 0 { // the new tail must read zeros
		m.verifyVolume(mv)
	}
}

func (m *modelTest) closeVolume(id string) {
	v := m.open[id]
	m.logf("Close %s", id)
	if err := v.Close(); err != nil {
		m.fatalf("Close(%s): %v", id, err)
	}
	delete(m.open, id)
	p := make([]byte, 1)
	if _, err := v.WriteAt(p, 0); !errors.Is(err, cow.ErrClosed) {
		m.fatalf("WriteAt on closed handle of %s: %v, want ErrClosed", id, err)
	}
	if _, err := v.ReadAt(p, 0); !errors.Is(err, cow.ErrClosed) {
		m.fatalf("ReadAt on closed handle of %s: %v, want ErrClosed", id, err)
	}
}

func (m *modelTest) opCloseVolume() {
	ids := slices.Sorted(maps.Keys(m.open))
	if len(ids) > 0 {
		m.closeVolume(ids[m.rng.Intn(len(ids))])
	}
}

// opReopenStore closes the store (with or without closing the volume handles
// first: Close must flush them) and opens it again; nothing may be lost.
func (m *modelTest) opReopenStore() {
	if m.rng.Intn(2) == 0 {
		for _, id := range slices.Sorted(maps.Keys(m.open)) {
			m.closeVolume(id)
		}
	}
	m.logf("reopen store (%d open handles)", len(m.open))
	m.check()
	old := m.s
	m.s = reopenStore(m.t, old, m.opts)
	for id, v := range m.open {
		if _, err := v.WriteAt([]byte{1}, 0); !errors.Is(err, cow.ErrClosed) {
			m.fatalf("WriteAt on handle of %s after store Close: %v, want ErrClosed", id, err)
		}
	}
	clear(m.open)
	if _, err := old.CreateVolume(m.ctx, cow.VolumeSpec{ID: "after-close", Size: cow.BlockSize}); !errors.Is(err, cow.ErrClosed) {
		m.fatalf("CreateVolume on a closed store: %v, want ErrClosed", err)
	}
	m.opList()
	if m.rng.Intn(2) == 0 {
		m.verifyEverything()
	}
}

func (m *modelTest) opList() {
	vols := m.s.ListVolumes()
	var gotIDs []string
	for _, vi := range vols {
		gotIDs = append(gotIDs, vi.ID)
		mv := m.vols[vi.ID]
		if mv == nil {
			continue
		}
		if vi.Size != int64(len(mv.data)) || vi.SourceSnapshot != mv.srcSnap || vi.SourceVolume != mv.srcVol || !maps.Equal(vi.Labels, mv.labels) {
			m.fatalf("ListVolumes entry %+v, want size %d source snapshot %q volume %q", vi, len(mv.data), mv.srcSnap, mv.srcVol)
		}
	}
	if want := slices.Sorted(maps.Keys(m.vols)); !slices.Equal(gotIDs, want) {
		m.fatalf("ListVolumes IDs %v, want %v (sorted)", gotIDs, want)
	}
	gotIDs = nil
	for _, si := range m.s.ListSnapshots() {
		gotIDs = append(gotIDs, si.ID)
		ms := m.snaps[si.ID]
		if ms == nil {
			continue
		}
		if si.VolumeID != ms.volID || si.Size != int64(len(ms.data)) || !maps.Equal(si.Labels, ms.labels) {
			m.fatalf("ListSnapshots entry %+v, want volume %s size %d labels %v", si, ms.volID, len(ms.data), ms.labels)
		}
	}
	if want := slices.Sorted(maps.Keys(m.snaps)); !slices.Equal(gotIDs, want) {
		m.fatalf("ListSnapshots IDs %v, want %v (sorted)", gotIDs, want)
	}
}

// nonzeroBlocks counts the blocks of data that hold a nonzero byte: each of
// them must be mapped somewhere in the chain.
func nonzeroBlocks(data []byte) int64 {
	var n int64
	zero := make([]byte, cow.BlockSize)
	for off := 0; off < len(data); off += cow.BlockSize {
		if p := data[off:min(off+cow.BlockSize, len(data))]; !bytes.Equal(p, zero[:len(p)]) {
			n++
		}
	}
	return n
}

func (m *modelTest) opUsage() {
	mv := m.pickVol()
	u, err := m.s.VolumeUsage(mv.id)
	size := int64(len(mv.data))
	if err != nil || u.Size != size || u.Allocated < nonzeroBlocks(mv.data)*cow.BlockSize || u.Allocated > size {
		m.fatalf("VolumeUsage(%s) = %+v, %v; want Size %d and %d <= Allocated <= Size",
			mv.id, u, err, size, nonzeroBlocks(mv.data)*cow.BlockSize)
	}
	if ms := m.pickSnap(); ms != nil {
		u, err := m.s.SnapshotUsage(ms.id)
		size := int64(len(ms.data))
		if err != nil || u.Size != size || u.Allocated < nonzeroBlocks(ms.data)*cow.BlockSize || u.Allocated > size ||
			u.Exclusive < 0 || u.Exclusive > u.Allocated {
			m.fatalf("SnapshotUsage(%s) = %+v, %v; want Size %d, %d <= Allocated <= Size, 0 <= Exclusive <= Allocated",
				ms.id, u, err, size, nonzeroBlocks(ms.data)*cow.BlockSize)
		}
	}
}

// opChanged checks ChangedExtents between two snapshots of one lineage: every
// byte where their contents differ must be covered (a superset is fine).
// Pairs in the wrong order or of different lineages must be refused.
func (m *modelTest) opChanged() {
	var pairs [][2]*modelSnap
	for _, target := range m.liveSnaps() {
		for _, base := range target.lineage {
			if !base.deleted {
				pairs = append(pairs, [2]*modelSnap{base, target})
			}
		}
	}
	if len(pairs) == 0 {
		m.opSnapshot()
		return
	}
	p := pairs[m.rng.Intn(len(pairs))]
	base, target := p[0], p[1]
	exts, err := m.s.ChangedExtents(base.id, target.id)
	if err != nil {
		m.fatalf("ChangedExtents(%s, %s): %v", base.id, target.id, err)
	}
	size := int64(len(target.data))
	for _, e := range exts {
		if e.Offset < 0 || e.Length <= 0 || e.Offset+e.Length > size {
			m.fatalf("ChangedExtents(%s, %s): extent %+v outside [0, %d)", base.id, target.id, e, size)
		}
	}
	if i := uncovered(exts, diffRuns(base.data, target.data)); i >= 0 {
		m.fatalf("ChangedExtents(%s, %s) = %v misses changed byte %d (block %d)", base.id, target.id, exts, i, i/cow.BlockSize)
	}
	if _, err := m.s.ChangedExtents(target.id, base.id); !errors.Is(err, cow.ErrInvalid) {
		m.fatalf("ChangedExtents(%s, %s) with base newer than target: %v, want ErrInvalid", target.id, base.id, err)
	}
	if _, err := m.s.ChangedExtents(base.id, "no-such-snap"); !errors.Is(err, cow.ErrNotFound) {
		m.fatalf("ChangedExtents(%s, unknown): %v, want ErrNotFound", base.id, err)
	}
	// Two snapshots neither of which is below the other are not one lineage.
	for _, a := range m.liveSnaps() {
		for _, b := range m.liveSnaps() {
			if a != b && !slices.Contains(a.lineage, b) && !slices.Contains(b.lineage, a) {
				if _, err := m.s.ChangedExtents(a.id, b.id); !errors.Is(err, cow.ErrInvalid) {
					m.fatalf("ChangedExtents(%s, %s) across lineages: %v, want ErrInvalid", a.id, b.id, err)
				}
				return
			}
		}
	}
}

func (m *modelTest) opAllocated() {
	ms := m.pickSnap()
	if ms == nil {
		return
	}
	exts, err := m.s.AllocatedExtents(ms.id)
	if err != nil {
		m.fatalf("AllocatedExtents(%s): %v", ms.id, err)
	}
	end := int64(-1)
	for _, e := range exts {
		if e.Length <= 0 || e.Offset <= end || e.Offset+e.Length > int64(len(ms.data)) {
			m.fatalf("AllocatedExtents(%s) = %v: not sorted, coalesced and inside [0, %d)", ms.id, exts, len(ms.data))
		}
		end = e.Offset + e.Length
	}
	if i := uncovered(exts, nonzeroRuns(ms.data)); i >= 0 {
		m.fatalf("AllocatedExtents(%s) = %v misses nonzero byte %d (block %d)", ms.id, exts, i, i/cow.BlockSize)
	}
}

func (m *modelTest) opVerifyVolume() { m.verifyVolume(m.pickVol()) }

func (m *modelTest) opVerifySnapshot() {
	if ms := m.pickSnap(); ms != nil {
		m.verifySnapshot(ms)
	}
}

func (m *modelTest) verifyVolume(mv *modelVol) {
	if d := diffAt(readAll(m.t, m.handle(mv)), mv.data); d != "" {
		m.fatalf("volume %s: %s", mv.id, d)
	}
}

func (m *modelTest) verifySnapshot(ms *modelSnap) {
	if d := diffAt(readSnapshot(m.ctx, m.t, m.s, ms.id, "verify-tmp"), ms.data); d != "" {
		m.fatalf("snapshot %s: %s", ms.id, d)
	}
}

func (m *modelTest) verifyEverything() {
	if err := m.s.WaitIdle(m.ctx); err != nil {
		m.fatalf("WaitIdle: %v", err)
	}
	m.check()
	m.opList()
	for _, id := range slices.Sorted(maps.Keys(m.vols)) {
		m.verifyVolume(m.vols[id])
	}
	for _, ms := range m.liveSnaps() {
		m.verifySnapshot(ms)
	}
}

// TestAPIErrors checks that every caller mistake is refused with the right
// sentinel, leaves no trace in the catalog, and creates nothing outside the
// store directory.
func TestAPIErrors(t *testing.T) {
	ctx := t.Context()
	parent := t.TempDir()
	dir := filepath.Join(parent, "store")
	s := openStore(t, dir)
	before := listTree(t, parent, dir)

	const size = 1 << 20
	for _, spec := range []cow.VolumeSpec{{ID: "base", Size: size}, {ID: "busy", Size: size}} {
		if _, err := s.CreateVolume(ctx, spec); err != nil {
			t.Fatalf("CreateVolume(%s): %v", spec.ID, err)
		}
	}
	if _, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "base-snap", VolumeID: "base"}); err != nil {
		t.Fatalf("CreateSnapshot: %v", err)
	}
	busy, err := s.OpenVolume(ctx, "busy")
	if err != nil {
		t.Fatalf("OpenVolume(busy): %v", err)
	}
	defer busy.Close()

	badIDs := []string{"", ".", "..", "a/b", "../x", "/abs", strings.Repeat("a", 300), strings.Repeat("a", 129),
		".hidden", "-dash", "a\x00b", "a b", "ü", "a\nb", `a\b`}
	for _, id := range badIDs {
		if err := cow.ValidateID(id); !errors.Is(err, cow.ErrInvalid) {
			t.Errorf("ValidateID(%q) = %v, want ErrInvalid", id, err)
		}
	}
	for _, id := range []string{"a", "A-1_b.c", "0", strings.Repeat("z", 128), "pvc-0a1b2c3d-4e5f"} {
		if err := cow.ValidateID(id); err != nil {
			t.Errorf("ValidateID(%q) = %v, want nil", id, err)
		}
	}

	type row struct {
		name string
		call func() error
		want []error // any of them
	}
	var rows []row
	for _, id := range badIDs {
		rows = append(rows,
			row{fmt.Sprintf("CreateVolume id %q", id), func() error {
				_, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: id, Size: size})
				return err
			}, []error{cow.ErrInvalid}},
			row{fmt.Sprintf("CreateSnapshot id %q", id), func() error {
				_, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: id, VolumeID: "base"})
				return err
			}, []error{cow.ErrInvalid}},
			row{fmt.Sprintf("CreateSnapshot of volume %q", id), func() error {
				_, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "snap-of-bad", VolumeID: id})
				return err
			}, []error{cow.ErrInvalid, cow.ErrNotFound}},
			row{fmt.Sprintf("DeleteVolume %q", id), func() error {
				return s.DeleteVolume(ctx, id)
			}, []error{cow.ErrInvalid, cow.ErrNotFound}},
			row{fmt.Sprintf("DeleteSnapshot %q", id), func() error {
				return s.DeleteSnapshot(ctx, id)
			}, []error{cow.ErrInvalid, cow.ErrNotFound}},
			row{fmt.Sprintf("OpenVolume %q", id), func() error {
				_, err := s.OpenVolume(ctx, id)
				return err
			}, []error{cow.ErrInvalid, cow.ErrNotFound}},
			row{fmt.Sprintf("ExpandVolume %q", id), func() error {
				_, err := s.ExpandVolume(ctx, id, 2*size)
				return err
			}, []error{cow.ErrInvalid, cow.ErrNotFound}},
		)
	}
	for _, id := range badIDs[1:] { // an empty source means none
		rows = append(rows,
			row{fmt.Sprintf("CreateVolume from snapshot %q", id), func() error {
				_, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "from-bad", Size: size, SourceSnapshot: id})
				return err
			}, []error{cow.ErrInvalid, cow.ErrNotFound}},
			row{fmt.Sprintf("CreateVolume from volume %q", id), func() error {
				_, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "from-bad", Size: size, SourceVolume: id})
				return err
			}, []error{cow.ErrInvalid, cow.ErrNotFound}},
		)
	}
	write := func(off int64, n int) func() error {
		return func() error { _, err := busy.WriteAt(make([]byte, n), off); return err }
	}
	rows = append(rows, []row{
		{"CreateVolume size 0", func() error {
			_, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "zero", Size: 0})
			return err
		}, []error{cow.ErrInvalid}},
		{"CreateVolume size -1", func() error {
			_, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "neg", Size: -1})
			return err
		}, []error{cow.ErrInvalid}},
		{"CreateVolume size -BlockSize", func() error {
			_, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "neg", Size: -cow.BlockSize})
			return err
		}, []error{cow.ErrInvalid}},
		{"CreateVolume unknown source snapshot", func() error {
			_, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "x", Size: size, SourceSnapshot: "nope"})
			return err
		}, []error{cow.ErrNotFound}},
		{"CreateVolume unknown source volume", func() error {
			_, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "x", Size: size, SourceVolume: "nope"})
			return err
		}, []error{cow.ErrNotFound}},
		{"CreateVolume both sources", func() error {
			_, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "x", Size: size, SourceSnapshot: "base-snap", SourceVolume: "base"})
			return err
		}, []error{cow.ErrInvalid}},
		{"restore into smaller size", func() error {
			_, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "x", Size: size - cow.BlockSize, SourceSnapshot: "base-snap"})
			return err
		}, []error{cow.ErrInvalid}},
		{"clone into smaller size", func() error {
			_, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "x", Size: size - cow.BlockSize, SourceVolume: "base"})
			return err
		}, []error{cow.ErrInvalid}},
		{"CreateVolume duplicate, same size", func() error {
			_, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "base", Size: size})
			return err
		}, []error{cow.ErrExists}},
		{"CreateVolume duplicate, other size", func() error {
			_, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "base", Size: 2 * size})
			return err
		}, []error{cow.ErrExists}},
		{"CreateSnapshot duplicate", func() error {
			_, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "base-snap", VolumeID: "base"})
			return err
		}, []error{cow.ErrExists}},
		{"CreateSnapshot duplicate of another volume", func() error {
			_, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "base-snap", VolumeID: "busy"})
			return err
		}, []error{cow.ErrExists}},
		{"CreateSnapshot of unknown volume", func() error {
			_, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: "x", VolumeID: "nope"})
			return err
		}, []error{cow.ErrNotFound}},
		{"CreateSnapshotGroup with an unknown volume", func() error {
			_, err := s.CreateSnapshotGroup(ctx, []cow.SnapshotSpec{{ID: "g1", VolumeID: "base"}, {ID: "g2", VolumeID: "nope"}})
			return err
		}, []error{cow.ErrNotFound}},
		{"CreateSnapshotGroup with a duplicate ID", func() error {
			_, err := s.CreateSnapshotGroup(ctx, []cow.SnapshotSpec{{ID: "g1", VolumeID: "base"}, {ID: "base-snap", VolumeID: "busy"}})
			return err
		}, []error{cow.ErrExists}},
		{"DeleteVolume unknown", func() error { return s.DeleteVolume(ctx, "nope") }, []error{cow.ErrNotFound}},
		{"DeleteVolume while open", func() error { return s.DeleteVolume(ctx, "busy") }, []error{cow.ErrInUse}},
		{"DeleteSnapshot unknown", func() error { return s.DeleteSnapshot(ctx, "nope") }, []error{cow.ErrNotFound}},
		{"OpenVolume twice", func() error { _, err := s.OpenVolume(ctx, "busy"); return err }, []error{cow.ErrInUse}},
		{"OpenVolume unknown", func() error { _, err := s.OpenVolume(ctx, "nope"); return err }, []error{cow.ErrNotFound}},
		{"ExpandVolume unknown", func() error { _, err := s.ExpandVolume(ctx, "nope", 2*size); return err }, []error{cow.ErrNotFound}},
		{"ExpandVolume shrink", func() error { _, err := s.ExpandVolume(ctx, "base", size/2); return err }, []error{cow.ErrInvalid}},
		{"ExpandVolume negative", func() error { _, err := s.ExpandVolume(ctx, "base", -1); return err }, []error{cow.ErrInvalid}},
		{"GetVolume unknown", func() error { _, err := s.GetVolume("nope"); return err }, []error{cow.ErrNotFound}},
		{"GetSnapshot unknown", func() error { _, err := s.GetSnapshot("nope"); return err }, []error{cow.ErrNotFound}},
		{"VolumeUsage unknown", func() error { _, err := s.VolumeUsage("nope"); return err }, []error{cow.ErrNotFound}},
		{"SnapshotUsage unknown", func() error { _, err := s.SnapshotUsage("nope"); return err }, []error{cow.ErrNotFound}},
		{"AllocatedExtents unknown", func() error { _, err := s.AllocatedExtents("nope"); return err }, []error{cow.ErrNotFound}},
		{"ChangedExtents unknown base", func() error { _, err := s.ChangedExtents("nope", "base-snap"); return err }, []error{cow.ErrNotFound}},
		{"WriteAt across the end", write(size-10, 20), []error{cow.ErrInvalid}},
		{"WriteAt at the end", write(size, 1), []error{cow.ErrInvalid}},
		{"WriteAt far past the end", write(1<<40, 1), []error{cow.ErrInvalid}},
		{"WriteAt negative offset", write(-1, 1), []error{cow.ErrInvalid}},
		{"ReadAt negative offset", func() error { _, err := busy.ReadAt(make([]byte, 1), -1); return err }, []error{cow.ErrInvalid}},
		{"Discard across the end", func() error { return busy.Discard(size-cow.BlockSize, 2*cow.BlockSize) }, []error{cow.ErrInvalid}},
		{"Discard negative length", func() error { return busy.Discard(0, -1) }, []error{cow.ErrInvalid}},
		{"WriteZeroes across the end", func() error { return busy.WriteZeroes(size-1, 2) }, []error{cow.ErrInvalid}},
		{"Open of a store open in this process", func() error {
			s2, err := cow.Open(dir, cow.Options{})
			if err == nil {
				s2.Close()
			}
			return err
		}, []error{cow.ErrInUse}},
	}...)

	for _, r := range rows {
		err := r.call()
		ok := false
		for _, want := range r.want {
			ok = ok || errors.Is(err, want)
		}
		if !ok {
			t.Errorf("%s: got %v, want one of %v", r.name, err, r.want)
		}
	}

	// Failed calls leave nothing behind: not in the catalog, not outside the store.
	var vols, snaps []string
	for _, v := range s.ListVolumes() {
		vols = append(vols, v.ID)
	}
	for _, sn := range s.ListSnapshots() {
		snaps = append(snaps, sn.ID)
	}
	if !slices.Equal(vols, []string{"base", "busy"}) || !slices.Equal(snaps, []string{"base-snap"}) {
		t.Errorf("after failed calls: volumes %v, snapshots %v; want [base busy] and [base-snap]", vols, snaps)
	}
	if info, err := s.GetVolume("base"); err != nil || info.Size != size {
		t.Errorf("GetVolume(base) after failed calls = %+v, %v; want size %d", info, err, size)
	}
	if after := listTree(t, parent, dir); !maps.Equal(before, after) {
		t.Errorf("files outside the store dir changed: before %v, after %v", before, after)
	}
	mustCheck(t, s)
}

// Concurrency: writers fill disjoint regions of one volume with recognizable
// blocks while snapshots are taken and a reader reads. Each write k of writer
// w goes to chunk k%concChunks of w's region, so for any instant the test
// knows which writes had completed before it and which had started.

const (
	concWriters     = 4
	concChunks      = 8
	concChunkBlocks = 2
	concRegion      = concChunks * concChunkBlocks * cow.BlockSize
)

// concBlock fills b (one block) for block j of the chunk written by write k of writer w.
func concBlock(b []byte, w, k, j int) {
	binary.LittleEndian.PutUint32(b[0:], 0xC0C0C0C0)
	binary.LittleEndian.PutUint32(b[4:], uint32(w))
	binary.LittleEndian.PutUint64(b[8:], uint64(k))
	binary.LittleEndian.PutUint64(b[16:], uint64(j))
	x := uint64(w)<<48 ^ uint64(k)<<8 ^ uint64(j) ^ 0x9E3779B97F4A7C15
	for i := 24; i < len(b); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[i:], x)
	}
}

// concProgress is, per writer, how many writes had completed (done) before an
// observation started and how many had started (started) when it ended.
type concProgress struct{ done, started [concWriters]int64 }

// checkConcImage checks an image of the whole volume against progress: each
// block holds the newest write to its chunk completed before, or a later one
// that had started; never an older one, another writer's block or garbage.
// A live read (live) may see a block torn by a write to it that was in
// flight during the read, as with any block device; such blocks are skipped.
// Snapshots are taken under the write barrier and are never torn.
func checkConcImage(img []byte, p concProgress, live bool) error {
	want := make([]byte, cow.BlockSize)
	for w := range concWriters {
		for c := range concChunks {
			lastDone := -1 // newest write to chunk c completed before
			for k := c; k < int(p.done[w]); k += concChunks {
				lastDone = k
			}
			if live && inFlight(int(p.done[w]), int(p.started[w]), c) {
				continue
			}
			for j := range concChunkBlocks {
				off := w*concRegion + (c*concChunkBlocks+j)*cow.BlockSize
				got := img[off : off+cow.BlockSize]
				if !slices.ContainsFunc(got, func(b byte) bool { return b != 0 }) {
					if lastDone >= 0 {
						return fmt.Errorf("writer %d chunk %d block %d: zeros, want write %d or newer", w, c, j, lastDone)
					}
					continue
				}
				k := int(binary.LittleEndian.Uint64(got[8:]))
				if k%concChunks != c || k < lastDone || k >= int(p.started[w]) {
					return fmt.Errorf("writer %d chunk %d block %d: write %d, want a write to this chunk in [%d, %d)",
						w, c, j, k, max(lastDone, 0), p.started[w])
				}
				concBlock(want, w, k, j)
				if !bytes.Equal(got, want) {
					return fmt.Errorf("writer %d chunk %d block %d: not the block of write %d (torn or garbage)", w, c, j, k)
				}
			}
		}
	}
	return nil
}

// inFlight reports whether one of writes [done, started) went to chunk c.
func inFlight(done, started, c int) bool {
	for k := done; k < started; k++ {
		if k%concChunks == c {
			return true
		}
	}
	return false
}

func TestConcurrentWritesAndSnapshots(t *testing.T) {
	seed := testSeed(t)
	ctx := t.Context()
	writes := scaled(240)
	const maxSnaps = 24
	s := openStore(t, t.TempDir())
	if _, err := s.CreateVolume(ctx, cow.VolumeSpec{ID: "conc", Size: concWriters * concRegion}); err != nil {
		t.Fatalf("CreateVolume: %v", err)
	}
	v, err := s.OpenVolume(ctx, "conc")
	if err != nil {
		t.Fatalf("OpenVolume: %v", err)
	}
	defer v.Close()

	var done, started [concWriters]atomic.Int64
	progressBefore := func(p *concProgress) {
		for w := range concWriters {
			p.done[w] = done[w].Load()
		}
	}
	progressAfter := func(p *concProgress) {
		for w := range concWriters {
			p.started[w] = started[w].Load()
		}
	}

	ticks := make(chan struct{}, maxSnaps)
	writersDone := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, concWriters+2)
	for w := range concWriters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed + int64(w)))
			buf := make([]byte, concChunkBlocks*cow.BlockSize)
			for k := range writes {
				c := k % concChunks
				for j := range concChunkBlocks {
					concBlock(buf[j*cow.BlockSize:(j+1)*cow.BlockSize], w, k, j)
				}
				started[w].Store(int64(k + 1))
				if _, err := v.WriteAt(buf, int64(w*concRegion+c*concChunkBlocks*cow.BlockSize)); err != nil {
					errs <- fmt.Errorf("writer %d write %d: %w", w, k, err)
					return
				}
				done[w].Store(int64(k + 1))
				if rng.Intn(50) == 0 {
					if err := v.Flush(); err != nil {
						errs <- fmt.Errorf("writer %d flush: %w", w, err)
						return
					}
				}
				if w == 0 && (k+1)%(writes/maxSnaps+1) == 0 {
					select {
					case ticks <- struct{}{}:
					default:
					}
				}
			}
		}()
	}
	go func() { wg.Wait(); close(writersDone); close(ticks) }()

	// The reader checks live reads the same way as snapshots.
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		img := make([]byte, concWriters*concRegion)
		for {
			select {
			case <-writersDone:
				return
			default:
			}
			var p concProgress
			progressBefore(&p)
			if _, err := v.ReadAt(img, 0); err != nil && err != io.EOF {
				errs <- fmt.Errorf("reader: %w", err)
				return
			}
			progressAfter(&p)
			if err := checkConcImage(img, p, true); err != nil {
				errs <- fmt.Errorf("live read: %w", err)
				return
			}
		}
	}()

	type taken struct {
		id      string
		p       concProgress
		deleted bool
	}
	checkSnap := func(tk *taken, when string) {
		t.Helper()
		if err := checkConcImage(readSnapshot(ctx, t, s, tk.id, "conc-tmp"), tk.p, false); err != nil {
			t.Errorf("snapshot %s %s (progress done %v started %v): %v", tk.id, when, tk.p.done, tk.p.started, err)
		}
	}
	var snaps []*taken
	for range ticks {
		tk := &taken{id: fmt.Sprintf("cs-%d", len(snaps))}
		progressBefore(&tk.p)
		if _, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: tk.id, VolumeID: "conc"}); err != nil {
			t.Fatalf("CreateSnapshot(%s) during writes: %v", tk.id, err)
		}
		progressAfter(&tk.p)
		snaps = append(snaps, tk)
		// Delete every other snapshot while the writes go on: its layer is
		// merged into the next one, under the live head.
		if n := len(snaps) - 3; n >= 0 && n%2 == 0 {
			old := snaps[n]
			checkSnap(old, "during writes")
			if err := s.DeleteSnapshot(ctx, old.id); err != nil {
				t.Fatalf("DeleteSnapshot(%s) during writes: %v", old.id, err)
			}
			old.deleted = true
		}
	}
	<-readerDone
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}

	// A snapshot after the writers finished holds exactly the final writes.
	final := &taken{id: "cs-final"}
	progressBefore(&final.p)
	progressAfter(&final.p)
	if _, err := s.CreateSnapshot(ctx, cow.SnapshotSpec{ID: final.id, VolumeID: "conc"}); err != nil {
		t.Fatalf("CreateSnapshot(final): %v", err)
	}
	snaps = append(snaps, final)
	t.Logf("%d snapshots during %d writes per writer", len(snaps), writes)
	if err := checkConcImage(readAll(t, v), final.p, false); err != nil {
		t.Fatalf("volume after writes: %v", err)
	}
	for _, tk := range snaps {
		if !tk.deleted {
			checkSnap(tk, "after writes")
		}
	}
	for i, tk := range snaps[:len(snaps)-1] {
		if !tk.deleted && i%2 == 1 {
			if err := s.DeleteSnapshot(ctx, tk.id); err != nil {
				t.Fatalf("DeleteSnapshot(%s): %v", tk.id, err)
			}
			tk.deleted = true
		}
	}
	if err := s.WaitIdle(ctx); err != nil {
		t.Fatalf("WaitIdle: %v", err)
	}
	for _, tk := range snaps {
		if !tk.deleted {
			checkSnap(tk, "after deleting its neighbours")
		}
	}
	if err := checkConcImage(readAll(t, v), final.p, false); err != nil {
		t.Fatalf("volume after deleting snapshots: %v", err)
	}
}
