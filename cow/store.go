package cow

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/internal/faultfs"
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
	// Faults, for tests only, puts the store's file I/O through a fault
	// injector (package faultfs); nil does plain I/O.
	Faults *faultfs.FS
}

// Store is a directory of layers plus the catalog that ties them into
// volumes and snapshots. All methods are safe for concurrent use.
type Store struct {
	dir     string
	opts    Options
	lock    *os.File
	closed  atomic.Bool
	layerFS string // dir/layers
	// arena holds the location extents of layers' fragmented
	// leaves (arena.go); nil where the filesystem has no O_TMPFILE
	// (they stay on the heap).
	arena *locArena

	// topo serializes every change to the catalog and to the layer graph.
	topo  sync.Mutex
	cat   *catalog
	vols  map[string]*volume
	byNum map[uint32]*layer // live layers (guarded by topo)
	slots slotTable         // layer number -> layer, for the read path
	nums  layerNums         // free layer numbers (guarded by topo)
	// gcMu lets one goroutine at a time (background or WaitIdle) merge.
	gcMu   sync.Mutex
	gcKick chan struct{}
	gcStop chan struct{}
	gcDone chan struct{}
	// gcFailures counts passes of the merger that met an error.
	gcFailures atomic.Int64
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
		gcKick: make(chan struct{}, 1), gcStop: make(chan struct{}), gcDone: make(chan struct{}),
		nums: layerNums{limit: layerNumLimit}}
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
	cat, err := openCatalog(s.dir, s.opts.Faults)
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
		l, ranges, err := openLayerFiles(s.layerFS, rec.Num, rec.Size, s.arena, s.opts.Faults)
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
	return s.loadVolumes()
}

// loadVolumes ties the catalog's volumes and snapshots to the layers load
// opened, removes orphan layer files and finds the free layer numbers.
func (s *Store) loadVolumes() error {
	cat := s.cat
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
	if err := s.removeOrphanFiles(); err != nil {
		return err
	}
	// The orphans' removal must be durable before their numbers are
	// reused (layernums.go).
	if err := syncDir(s.opts.Faults, s.layerFS); err != nil {
		return err
	}
	s.nums.initFree(s.byNum, cat.maxLayer)
	return nil
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
			if err := s.opts.Faults.Remove(filepath.Join(s.layerFS, name)); err != nil {
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
	slotChunks    = 16384 // 64 Mi layer numbers in use at once
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
			// Under the barrier: writes in flight finish first, and later
			// ones see the handle closed before they touch the layers,
			// which are closed next.
			v.barrier.Lock()
			errs = append(errs, v.head.Load().flush(s.layerFS))
			v.handle.closed.Store(true)
			v.handle = nil
			v.barrier.Unlock()
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
// layer.ensureFiles), so it cannot fail on I/O; it fails only when every
// layer number is in use (layernums.go).
func (s *Store) newLayer(parent *layer, size int64) (*layer, error) {
	num, err := s.newLayerNum()
	if err != nil {
		return nil, err
	}
	l := newLayerStruct(num, size, s.arena, s.opts.Faults)
	l.parent = parent
	if parent != nil {
		l.tree = parent.tree.fork()
	} else {
		l.tree = tree{gen: newGen()}
	}
	return l, nil
}

// discardLayer undoes newLayer after a failed commit. The number is not
// reused before the next open (layernums.go).
func (s *Store) discardLayer(l *layer) {
	l.close()
	_ = removeLayerFiles(s.opts.Faults, s.layerFS, l.num)
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

// Capacity reports the size and free space of the filesystem under the store.
func (s *Store) Capacity() (total, free int64, err error) {
	var st unix.Statfs_t
	if err := unix.Statfs(s.dir, &st); err != nil {
		return 0, 0, ioErr(err)
	}
	return int64(st.Blocks) * st.Bsize, int64(st.Bavail) * st.Bsize, nil
}

func (s *Store) String() string { return fmt.Sprintf("cow.Store(%s)", s.dir) }

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
