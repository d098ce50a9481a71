package cow

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
)

const (
	blockShift = 12
	// BlockSize is the unit of the extent map. See the package documentation
	// for why it is 4 KiB.
	BlockSize = 1 << blockShift

	layersDir = "layers"
	lockName  = "LOCK"
	maxIDLen  = 128
)

// Options tune a Store.
type Options struct {
	// NoBackgroundMerge disables the background merger (tests): merges and
	// removals of unreferenced layers then happen only in WaitIdle.
	NoBackgroundMerge bool
}

// Store is a directory of layers plus the catalog that ties them into
// volumes and snapshots. All methods are safe for concurrent use.
type Store struct {
	dir     string
	opts    Options
	lock    *os.File
	closed  atomic.Bool
	layerFS string // dir/layers
	// arena holds the location extents of dense layers' fragmented
	// leaves (arena.go); nil where the filesystem has no O_TMPFILE
	// (they stay on the heap).
	arena *locArena

	// topo serializes every change to the catalog and to the layer graph.
	topo  sync.Mutex
	cat   *catalog
	vols  map[string]*volume
	byNum map[uint32]*layer // live layers (guarded by topo)
	slots slotTable         // layer number -> layer, for the read path
	// gcMu lets one goroutine at a time (background or WaitIdle) merge.
	gcMu   sync.Mutex
	gcKick chan struct{}
	gcStop chan struct{}
	gcDone chan struct{}
}

// ValidateID checks a volume or snapshot ID: 1 to 128 characters of
// [A-Za-z0-9._-], not starting with '.' or '-'. IDs never reach file names,
// but the rule keeps them printable and safe wherever they go.
func ValidateID(id string) error {
	if id == "" || len(id) > maxIDLen {
		return errf(ErrInvalid, "ID must be 1 to %d characters, got %d", maxIDLen, len(id))
	}
	if id[0] == '.' || id[0] == '-' {
		return errf(ErrInvalid, "ID %q must not start with '.' or '-'", id)
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return errf(ErrInvalid, "ID %q has a character outside [A-Za-z0-9._-]", id)
		}
	}
	return nil
}

// Open opens the store in dir, creating it if needed. Only one process may
// have a store open at a time.
func Open(dir string, opts Options) (*Store, error) {
	if err := os.MkdirAll(filepath.Join(dir, layersDir), 0o700); err != nil {
		return nil, ioErr(err)
	}
	lock, err := os.OpenFile(filepath.Join(dir, lockName), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, ioErr(err)
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, errf(ErrInUse, "store %s is open in another process", dir)
	}
	s := &Store{dir: dir, opts: opts, lock: lock, layerFS: filepath.Join(dir, layersDir),
		vols: map[string]*volume{}, byNum: map[uint32]*layer{},
		gcKick: make(chan struct{}, 1), gcStop: make(chan struct{}), gcDone: make(chan struct{})}
	s.arena = newLocArena(s.layerFS)
	if err := s.load(); err != nil {
		s.closeLayers()
		_ = s.arena.close()
		if s.cat != nil {
			s.cat.close()
		}
		lock.Close()
		return nil, err
	}
	go s.gcLoop()
	s.kickGC()
	return s, nil
}

// load reads the catalog, opens every layer and rebuilds the trees.
func (s *Store) load() error {
	cat, err := openCatalog(s.dir)
	if err != nil {
		return err
	}
	s.cat = cat
	// Open layers parents first so every tree forks its parent's.
	var order []*ondisk.LayerRec
	seen := map[uint32]bool{}
	var visit func(rec *ondisk.LayerRec, depth int) error
	visit = func(rec *ondisk.LayerRec, depth int) error {
		if seen[rec.Num] {
			return nil
		}
		if depth > len(cat.layers) {
			return errf(ErrCorrupt, "catalog: layer %d is in a parent cycle", rec.Num)
		}
		if rec.Parent != 0 {
			p, ok := cat.layers[rec.Parent]
			if !ok {
				return errf(ErrCorrupt, "catalog: layer %d has missing parent %d", rec.Num, rec.Parent)
			}
			if err := visit(p, depth+1); err != nil {
				return err
			}
		}
		seen[rec.Num] = true
		order = append(order, rec)
		return nil
	}
	nums := make([]uint32, 0, len(cat.layers))
	for n := range cat.layers {
		nums = append(nums, n)
	}
	sort.Slice(nums, func(i, j int) bool { return nums[i] < nums[j] })
	for _, n := range nums {
		if err := visit(cat.layers[n], 0); err != nil {
			return err
		}
	}
	for _, rec := range order {
		l, ranges, err := openLayerFiles(s.layerFS, rec.Num, rec.Size, s.arena)
		if err != nil {
			return err
		}
		l.frozen = rec.Frozen
		if rec.Parent != 0 {
			l.parent = s.byNum[rec.Parent]
			l.tree = l.parent.tree.fork()
		} else {
			l.tree = tree{gen: newGen()}
		}
		limit := uint64(rec.Size) >> blockShift
		for _, r := range ranges {
			if r.End() > limit {
				return errf(ErrCorrupt, "layer %d owns blocks %d+%d beyond its size", rec.Num, r.Start, r.Count)
			}
			l.tree.setRange(r.Start, r.End(), l.num)
		}
		s.byNum[l.num] = l
		s.slots.set(l.num, l)
	}
	for _, v := range cat.volumes {
		head, ok := s.byNum[v.Head]
		if !ok || head.frozen {
			return errf(ErrCorrupt, "catalog: volume %s has bad head layer %d", v.ID, v.Head)
		}
		vol := &volume{id: v.ID, s: s}
		vol.head.Store(head)
		vol.size.Store(v.Size)
		s.vols[v.ID] = vol
	}
	for _, sn := range cat.snaps {
		if l, ok := s.byNum[sn.Layer]; !ok || !l.frozen {
			return errf(ErrCorrupt, "catalog: snapshot %s has bad layer %d", sn.ID, sn.Layer)
		}
	}
	return s.removeOrphanFiles()
}

// removeOrphanFiles deletes layer files the catalog does not know: layers
// created by an operation that crashed before its commit, or removed by one
// that crashed after it.
func (s *Store) removeOrphanFiles() error {
	ents, err := os.ReadDir(s.layerFS)
	if err != nil {
		return ioErr(err)
	}
	for _, e := range ents {
		name := e.Name()
		base := strings.TrimSuffix(strings.TrimSuffix(name, ".data"), ".map")
		n, err := strconv.ParseUint(base, 16, 32)
		if err != nil || base == name {
			continue // not ours; leave it
		}
		if _, ok := s.byNum[uint32(n)]; !ok {
			if err := os.Remove(filepath.Join(s.layerFS, name)); err != nil {
				return ioErr(err)
			}
		}
	}
	return nil
}

// slotTable maps layer numbers to layers for the I/O path without locks.
// Merged layers stay in it so old index entries still resolve. Two levels of
// atomic pointers: setting one entry is O(1), whatever the number of layers.
type slotTable struct {
	chunks [slotChunks]atomic.Pointer[[slotChunkSize]atomic.Pointer[layer]]
}

const (
	slotChunkSize = 4096
	slotChunks    = 16384 // 64 Mi layer numbers over a store's life
)

func (t *slotTable) get(n uint32) *layer {
	if n/slotChunkSize >= slotChunks {
		return nil
	}
	c := t.chunks[n/slotChunkSize].Load()
	if c == nil {
		return nil
	}
	return c[n%slotChunkSize].Load()
}

// set stores l at n; callers serialize (Store.topo or Open).
func (t *slotTable) set(n uint32, l *layer) {
	c := t.chunks[n/slotChunkSize].Load()
	if c == nil {
		c = new([slotChunkSize]atomic.Pointer[layer])
		t.chunks[n/slotChunkSize].Store(c)
	}
	c[n%slotChunkSize].Store(l)
}

// resolve returns the layer holding the blocks tree entry num names.
func (s *Store) resolve(num uint32) *layer {
	if l := s.slots.get(num); l != nil {
		return l.canonical()
	}
	return nil
}

func (s *Store) checkOpen() error {
	if s.closed.Load() {
		return errf(ErrClosed, "store %s", s.dir)
	}
	return nil
}

// Dir is the store's directory.
func (s *Store) Dir() string { return s.dir }

// Close flushes open volumes and closes the store.
func (s *Store) Close() error {
	if s.closed.Swap(true) {
		return nil
	}
	close(s.gcStop)
	<-s.gcDone
	s.topo.Lock()
	defer s.topo.Unlock()
	var errs []error
	for _, v := range s.vols {
		if v.handle != nil {
			errs = append(errs, v.head.Load().flush(s.layerFS))
			v.handle.closed.Store(true)
			v.handle = nil
		}
	}
	s.closeLayers()
	errs = append(errs, s.arena.close())
	errs = append(errs, s.cat.close())
	errs = append(errs, s.lock.Close())
	return errors.Join(errs...)
}

func (s *Store) closeLayers() {
	for _, l := range s.byNum {
		l.close()
	}
}

// newLayer makes a layer above parent. It creates no files (see
// layer.ensureFiles), so it cannot fail on I/O.
func (s *Store) newLayer(parent *layer, size int64) (*layer, error) {
	num := s.cat.maxLayer + 1
	for _, ok := s.byNum[num]; ok; _, ok = s.byNum[num] {
		num++
	}
	if num/slotChunkSize >= slotChunks {
		return nil, errf(ErrNoSpace, "layer numbers exhausted")
	}
	l := newLayerStruct(num, size, s.arena)
	l.parent = parent
	if parent != nil {
		l.tree = parent.tree.fork()
	} else {
		l.tree = tree{gen: newGen()}
	}
	return l, nil
}

// discardLayer undoes newLayer after a failed commit.
func (s *Store) discardLayer(l *layer) {
	l.close()
	_ = removeLayerFiles(s.layerFS, l.num)
}

func layerRec(l *layer) *ondisk.LayerRec {
	rec := &ondisk.LayerRec{Num: l.num, Size: l.size.Load(), Frozen: l.frozen}
	if l.parent != nil {
		rec.Parent = l.parent.num
	}
	return rec
}

func roundUp(size int64) int64 { return (size + BlockSize - 1) &^ (BlockSize - 1) }

func copyLabels(m map[string]string) map[string]string {
	if len(m) == 0 {
		return nil
	}
	c := make(map[string]string, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

func volumeInfo(r *ondisk.VolumeRec) VolumeInfo {
	return VolumeInfo{ID: r.ID, Size: r.Size, SourceSnapshot: r.SourceSnapshot, SourceVolume: r.SourceVolume,
		Labels: copyLabels(r.Labels), CreatedAt: time.Unix(0, r.Created)}
}

func snapshotInfo(r *ondisk.SnapshotRec) SnapshotInfo {
	return SnapshotInfo{ID: r.ID, VolumeID: r.VolumeID, Size: r.Size, Labels: copyLabels(r.Labels),
		CreatedAt: time.Unix(0, r.Created)}
}

// CreateVolume creates an empty volume, a restore of a snapshot or a clone of
// a volume. Restore and clone are O(1): the new volume's head layer sits on
// the snapshot's layer (or on the source's head, frozen for the purpose).
func (s *Store) CreateVolume(ctx context.Context, spec VolumeSpec) (VolumeInfo, error) {
	if err := ValidateID(spec.ID); err != nil {
		return VolumeInfo{}, err
	}
	if spec.Size <= 0 || spec.Size > MaxVolumeSize {
		return VolumeInfo{}, errf(ErrInvalid, "volume size %d not in (0, %d]", spec.Size, MaxVolumeSize)
	}
	if spec.SourceSnapshot != "" && spec.SourceVolume != "" {
		return VolumeInfo{}, errf(ErrInvalid, "a volume has at most one source")
	}
	size := roundUp(spec.Size)
	if err := ctx.Err(); err != nil {
		return VolumeInfo{}, err
	}
	s.topo.Lock()
	defer s.topo.Unlock()
	if err := s.checkOpen(); err != nil {
		return VolumeInfo{}, err
	}
	if _, ok := s.cat.volumes[spec.ID]; ok {
		return VolumeInfo{}, errf(ErrExists, "volume %s", spec.ID)
	}
	rec := &ondisk.VolumeRec{ID: spec.ID, Size: size, SourceSnapshot: spec.SourceSnapshot,
		SourceVolume: spec.SourceVolume, Labels: copyLabels(spec.Labels), Created: time.Now().UnixNano()}
	var ops []ondisk.Op
	var created []*layer
	var parent *layer
	var srcVol *volume
	switch {
	case spec.SourceSnapshot != "":
		sn, ok := s.cat.snaps[spec.SourceSnapshot]
		if !ok {
			return VolumeInfo{}, errf(ErrNotFound, "snapshot %s", spec.SourceSnapshot)
		}
		if size < sn.Size {
			return VolumeInfo{}, errf(ErrInvalid, "volume size %d is smaller than snapshot %s (%d)", size, sn.ID, sn.Size)
		}
		parent = s.byNum[sn.Layer]
	case spec.SourceVolume != "":
		srcVol = s.vols[spec.SourceVolume]
		if srcVol == nil {
			return VolumeInfo{}, errf(ErrNotFound, "volume %s", spec.SourceVolume)
		}
		if size < srcVol.size.Load() {
			return VolumeInfo{}, errf(ErrInvalid, "volume size %d is smaller than source volume %s (%d)", size, srcVol.id, srcVol.size.Load())
		}
		// Freeze the source's head; the source continues on a new head and
		// the clone starts its own head on the frozen one.
		srcVol.barrier.Lock()
		defer srcVol.barrier.Unlock()
		frozen := srcVol.head.Load()
		if err := frozen.flush(s.layerFS); err != nil {
			return VolumeInfo{}, err
		}
		newHead, err := s.newLayer(frozen, srcVol.size.Load())
		if err != nil {
			return VolumeInfo{}, err
		}
		created = append(created, newHead)
		parent = frozen
		srcRec := *s.cat.volumes[srcVol.id]
		srcRec.Head = newHead.num
		frozenRec := layerRec(frozen)
		frozenRec.Frozen = true
		ops = append(ops, ondisk.Op{Kind: ondisk.OpPutLayer, Layer: frozenRec},
			ondisk.Op{Kind: ondisk.OpPutLayer, Layer: layerRec(newHead)},
			ondisk.Op{Kind: ondisk.OpPutVolume, Volume: &srcRec})
	}
	head, err := s.newLayerAfter(parent, size, created)
	if err != nil {
		for _, l := range created {
			s.discardLayer(l)
		}
		return VolumeInfo{}, err
	}
	created = append(created, head)
	rec.Head = head.num
	ops = append(ops, ondisk.Op{Kind: ondisk.OpPutLayer, Layer: layerRec(head)},
		ondisk.Op{Kind: ondisk.OpPutVolume, Volume: rec})
	if err := s.cat.commit(ops); err != nil {
		for _, l := range created {
			s.discardLayer(l)
		}
		return VolumeInfo{}, err
	}
	for _, l := range created {
		s.byNum[l.num] = l
		s.slots.set(l.num, l)
	}
	if srcVol != nil {
		parent.frozen = true
		srcVol.head.Store(created[0])
	}
	v := &volume{id: rec.ID, s: s}
	v.head.Store(head)
	v.size.Store(size)
	s.vols[rec.ID] = v
	return volumeInfo(rec), nil
}

// newLayerAfter is newLayer that also skips numbers taken by layers created
// earlier in the same, not yet committed, operation.
func (s *Store) newLayerAfter(parent *layer, size int64, pending []*layer) (*layer, error) {
	for _, p := range pending {
		s.byNum[p.num] = p
	}
	l, err := s.newLayer(parent, size)
	for _, p := range pending {
		delete(s.byNum, p.num)
	}
	return l, err
}

// DeleteVolume deletes a volume. Its head layer goes at once; layers below
// that no snapshot or other volume needs are merged or removed in the
// background.
func (s *Store) DeleteVolume(ctx context.Context, id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	s.topo.Lock()
	defer s.topo.Unlock()
	if err := s.checkOpen(); err != nil {
		return err
	}
	v, ok := s.vols[id]
	if !ok {
		return errf(ErrNotFound, "volume %s", id)
	}
	if v.handle != nil {
		return errf(ErrInUse, "volume %s is open", id)
	}
	if err := s.cat.commit([]ondisk.Op{{Kind: ondisk.OpDelVolume, ID: id}}); err != nil {
		return err
	}
	delete(s.vols, id)
	s.kickGC()
	return nil
}

// ExpandVolume grows a volume; it works while the volume is open.
func (s *Store) ExpandVolume(ctx context.Context, id string, size int64) (VolumeInfo, error) {
	if err := ValidateID(id); err != nil {
		return VolumeInfo{}, err
	}
	if size <= 0 || size > MaxVolumeSize {
		return VolumeInfo{}, errf(ErrInvalid, "volume size %d not in (0, %d]", size, MaxVolumeSize)
	}
	size = roundUp(size)
	s.topo.Lock()
	defer s.topo.Unlock()
	if err := s.checkOpen(); err != nil {
		return VolumeInfo{}, err
	}
	v, ok := s.vols[id]
	if !ok {
		return VolumeInfo{}, errf(ErrNotFound, "volume %s", id)
	}
	cur := s.cat.volumes[id]
	if size < cur.Size {
		return VolumeInfo{}, errf(ErrInvalid, "volume %s cannot shrink from %d to %d", id, cur.Size, size)
	}
	if size == cur.Size {
		return volumeInfo(cur), nil
	}
	v.barrier.Lock()
	defer v.barrier.Unlock()
	head := v.head.Load()
	rec := *cur
	rec.Size = size
	lrec := layerRec(head)
	lrec.Size = size
	if err := s.cat.commit([]ondisk.Op{{Kind: ondisk.OpPutLayer, Layer: lrec}, {Kind: ondisk.OpPutVolume, Volume: &rec}}); err != nil {
		return VolumeInfo{}, err
	}
	head.size.Store(size)
	v.size.Store(size)
	return volumeInfo(&rec), nil
}

// GetVolume looks a volume up.
func (s *Store) GetVolume(id string) (VolumeInfo, error) {
	return getRecord(s, id, "volume", func() map[string]*ondisk.VolumeRec { return s.cat.volumes }, volumeInfo)
}

// ListVolumes lists every volume, sorted by ID.
func (s *Store) ListVolumes() []VolumeInfo {
	return listRecords(s, func() map[string]*ondisk.VolumeRec { return s.cat.volumes }, volumeInfo,
		func(v VolumeInfo) string { return v.ID })
}

// getRecord looks id up in one of the catalog's tables (read under topo).
func getRecord[R, I any](s *Store, id, kind string, table func() map[string]*R, info func(*R) I) (I, error) {
	var zero I
	if err := ValidateID(id); err != nil {
		return zero, err
	}
	s.topo.Lock()
	defer s.topo.Unlock()
	if err := s.checkOpen(); err != nil {
		return zero, err
	}
	rec, ok := table()[id]
	if !ok {
		return zero, errf(ErrNotFound, "%s %s", kind, id)
	}
	return info(rec), nil
}

// listRecords lists one of the catalog's tables sorted by ID.
func listRecords[R, I any](s *Store, table func() map[string]*R, info func(*R) I, id func(I) string) []I {
	s.topo.Lock()
	defer s.topo.Unlock()
	recs := table()
	out := make([]I, 0, len(recs))
	for _, r := range recs {
		out = append(out, info(r))
	}
	sort.Slice(out, func(i, j int) bool { return id(out[i]) < id(out[j]) })
	return out
}

// CreateSnapshot freezes the volume's head as the snapshot and starts a new,
// empty head: no data or map is copied. In-flight writes finish first and the
// head is flushed, so the snapshot holds every write that returned before.
func (s *Store) CreateSnapshot(ctx context.Context, spec SnapshotSpec) (SnapshotInfo, error) {
	infos, err := s.CreateSnapshotGroup(ctx, []SnapshotSpec{spec})
	if err != nil {
		return SnapshotInfo{}, err
	}
	return infos[0], nil
}

// CreateSnapshotGroup snapshots several volumes at one instant: all their
// write barriers are held together and one catalog commit creates all.
func (s *Store) CreateSnapshotGroup(ctx context.Context, specs []SnapshotSpec) ([]SnapshotInfo, error) {
	if len(specs) == 0 {
		return nil, errf(ErrInvalid, "no snapshots requested")
	}
	ids, vids := map[string]bool{}, map[string]bool{}
	for _, sp := range specs {
		if err := ValidateID(sp.ID); err != nil {
			return nil, err
		}
		if err := ValidateID(sp.VolumeID); err != nil {
			return nil, err
		}
		if ids[sp.ID] || vids[sp.VolumeID] {
			return nil, errf(ErrInvalid, "snapshot or volume named twice in one group")
		}
		ids[sp.ID], vids[sp.VolumeID] = true, true
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.topo.Lock()
	defer s.topo.Unlock()
	if err := s.checkOpen(); err != nil {
		return nil, err
	}
	vols := make([]*volume, len(specs))
	for i, sp := range specs {
		if _, ok := s.cat.snaps[sp.ID]; ok {
			return nil, errf(ErrExists, "snapshot %s", sp.ID)
		}
		v, ok := s.vols[sp.VolumeID]
		if !ok {
			return nil, errf(ErrNotFound, "volume %s", sp.VolumeID)
		}
		vols[i] = v
	}
	// Lock barriers in ID order so concurrent groups cannot deadlock (topo
	// already serializes them; the order is for clarity and future changes).
	order := append([]*volume(nil), vols...)
	sort.Slice(order, func(i, j int) bool { return order[i].id < order[j].id })
	for _, v := range order {
		v.barrier.Lock()
		defer v.barrier.Unlock()
	}
	now := time.Now().UnixNano()
	var ops []ondisk.Op
	var created []*layer
	fail := func(err error) ([]SnapshotInfo, error) {
		for _, l := range created {
			s.discardLayer(l)
		}
		return nil, err
	}
	recs := make([]*ondisk.SnapshotRec, len(specs))
	for i, sp := range specs {
		v := vols[i]
		head := v.head.Load()
		if err := head.flush(s.layerFS); err != nil {
			return fail(err)
		}
		nh, err := s.newLayerAfter(head, v.size.Load(), created)
		if err != nil {
			return fail(err)
		}
		created = append(created, nh)
		frozenRec := layerRec(head)
		frozenRec.Frozen = true
		vrec := *s.cat.volumes[v.id]
		vrec.Head = nh.num
		recs[i] = &ondisk.SnapshotRec{ID: sp.ID, VolumeID: v.id, Layer: head.num, Size: v.size.Load(),
			Labels: copyLabels(sp.Labels), Created: now}
		ops = append(ops, ondisk.Op{Kind: ondisk.OpPutLayer, Layer: frozenRec},
			ondisk.Op{Kind: ondisk.OpPutLayer, Layer: layerRec(nh)},
			ondisk.Op{Kind: ondisk.OpPutVolume, Volume: &vrec},
			ondisk.Op{Kind: ondisk.OpPutSnapshot, Snapshot: recs[i]})
	}
	if err := s.cat.commit(ops); err != nil {
		return fail(err)
	}
	out := make([]SnapshotInfo, len(specs))
	for i, v := range vols {
		v.head.Load().frozen = true
		s.byNum[created[i].num] = created[i]
		s.slots.set(created[i].num, created[i])
		v.head.Store(created[i])
		out[i] = snapshotInfo(recs[i])
	}
	return out, nil
}

// DeleteSnapshot deletes a snapshot. Volumes restored or cloned from it keep
// working: its layer stays while they need it and is merged into its single
// remaining child in the background.
func (s *Store) DeleteSnapshot(ctx context.Context, id string) error {
	if err := ValidateID(id); err != nil {
		return err
	}
	s.topo.Lock()
	defer s.topo.Unlock()
	if err := s.checkOpen(); err != nil {
		return err
	}
	if _, ok := s.cat.snaps[id]; !ok {
		return errf(ErrNotFound, "snapshot %s", id)
	}
	if err := s.cat.commit([]ondisk.Op{{Kind: ondisk.OpDelSnapshot, ID: id}}); err != nil {
		return err
	}
	s.kickGC()
	return nil
}

// GetSnapshot looks a snapshot up.
func (s *Store) GetSnapshot(id string) (SnapshotInfo, error) {
	return getRecord(s, id, "snapshot", func() map[string]*ondisk.SnapshotRec { return s.cat.snaps }, snapshotInfo)
}

// ListSnapshots lists every snapshot, sorted by ID.
func (s *Store) ListSnapshots() []SnapshotInfo {
	return listRecords(s, func() map[string]*ondisk.SnapshotRec { return s.cat.snaps }, snapshotInfo,
		func(v SnapshotInfo) string { return v.ID })
}

// Capacity reports the size and free space of the filesystem under the store.
func (s *Store) Capacity() (total, free int64, err error) {
	var st unix.Statfs_t
	if err := unix.Statfs(s.dir, &st); err != nil {
		return 0, 0, ioErr(err)
	}
	return int64(st.Blocks) * st.Bsize, int64(st.Bavail) * st.Bsize, nil
}

func (s *Store) String() string { return fmt.Sprintf("cow.Store(%s)", s.dir) }
