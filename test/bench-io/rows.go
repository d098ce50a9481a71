package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/cowcsi/cowcsi/cow"
)

// target is one side of a row.
type target struct {
	name string
	path string
	size int64
	vol  *countingVolume // the engine serves it; nil for the limit
	// prep, if set, runs before each run: it may return a new path (a
	// fresh sparse file) and something to undo after the run.
	prep func(ctx context.Context, round int) (path string, undo func() error, err error)
}

type row struct {
	ID     string  `json:"id"`
	Name   string  `json:"name"`
	Unit   string  `json:"unit"`
	A      string  `json:"a"`
	B      string  `json:"b"`
	Target float64 `json:"target"`

	kind kind
	a, b *target

	ARuns  []fioResult `json:"a_runs"`
	BRuns  []fioResult `json:"b_runs"`
	Ratios []float64   `json:"ratios"`
	AMed   float64     `json:"a_median"`
	BMed   float64     `json:"b_median"`
	RMed   float64     `json:"ratio_median"`
	// BFlushMed is the median time the engine took to flush a write run's
	// data at its end (not part of fio's figures).
	BFlushMed float64 `json:"b_engine_flush_ms_median,omitempty"`
	// CPURatios are B's busy CPU per I/O over A's, per round.
	CPURatios   []float64 `json:"cpu_per_io_ratios"`
	CPURatioMed float64   `json:"cpu_per_io_ratio_median"`
}

func (r *row) value(res fioResult) float64 {
	if r.kind.bs() >= 1<<20 {
		return res.BytesPerSec / 1e6
	}
	return res.IOPS
}

func (r *row) group() string { return r.ID[:strings.IndexByte(r.ID, '-')] }

func wanted(c config, ids ...string) bool {
	if len(c.Only) == 0 {
		return true
	}
	for _, id := range ids {
		for _, o := range c.Only {
			if o == id || strings.HasPrefix(id, o+"-") {
				return true
			}
		}
	}
	return false
}

// Row IDs by group, to decide which devices setup needs.
var (
	rawIDs  = []string{"raw-1m-write", "raw-1m-read", "raw-4k-randread", "raw-4k-randwrite"}
	coldIDs = []string{"raw-1m-read-cold", "raw-4k-randread-cold"}
	ext4IDs = []string{"ext4-1m-write", "ext4-1m-read", "ext4-4k-randread", "ext4-4k-randwrite"}
)

// rowSet collects the rows setup makes and the engine volumes they use.
type rowSet struct {
	ctx  context.Context
	c    config
	e    *env
	rows []*row
	vols []*countingVolume
}

// fill writes size bytes to path with data fio can verify.
func (s *rowSet) fill(name, path string, size int64) error {
	t0 := time.Now()
	_, err := runFio(s.ctx, s.e.dir, "fill-"+name, fioSpec{kind: seqWrite, path: path, size: size})
	fmt.Fprintf(os.Stderr, "filled %s (%d MiB) in %v\n", name, size>>20, time.Since(t0).Round(100*time.Millisecond))
	return err
}

// add adds a row comparing a (the limit side) with b, if -only wants it.
func (s *rowSet) add(id, name string, k kind, target float64, a, b *target) {
	if !wanted(s.c, id) {
		return
	}
	unit := "IOPS"
	if k.bs() >= 1<<20 {
		unit = "MB/s"
	}
	s.rows = append(s.rows, &row{ID: id, Name: name, Unit: unit, A: a.name, B: b.name, Target: target, kind: k, a: a, b: b})
}

// fourRows adds the 1M sequential and 4k random rows of a group.
func (s *rowSet) fourRows(group, prefix string, a, b *target) {
	s.add(group+"-1m-write", prefix+"1M seq write", seqWrite, 0.8, a, b)
	s.add(group+"-1m-read", prefix+"1M seq read", seqRead, 0.8, a, b)
	s.add(group+"-4k-randread", prefix+"4k randread", randRead, 0.5, a, b)
	s.add(group+"-4k-randwrite", prefix+"4k randwrite", randWrite, 0.5, a, b)
}

// setup creates the devices of the wanted rows and fills them with data fio
// can verify (a header every 4 KiB).
func setup(ctx context.Context, c config, e *env) ([]*row, []*countingVolume, error) {
	s := &rowSet{ctx: ctx, c: c, e: e}
	var limit *target
	if wanted(c, rawIDs...) || (c.Cold && wanted(c, coldIDs...)) || wanted(c, "snap-4k-randwrite") {
		ld, err := e.limitDevice(ctx, "limit", c.Size)
		if err != nil {
			return nil, nil, err
		}
		if err := s.fill("limit", ld.Path, c.Size); err != nil {
			return nil, nil, err
		}
		limit = &target{name: "limit", path: ld.Path, size: c.Size}
	}
	if wanted(c, rawIDs...) || (c.Cold && wanted(c, coldIDs...)) {
		if err := s.rawRows(limit); err != nil {
			return nil, nil, err
		}
	}
	if wanted(c, "snap-4k-randwrite") {
		if err := s.snapRow(limit); err != nil {
			return nil, nil, err
		}
	}
	if wanted(c, "depth-4k-randread") || (c.Cold && wanted(c, "depth-4k-randread-cold")) {
		if err := s.depthRows(); err != nil {
			return nil, nil, err
		}
	}
	if wanted(c, ext4IDs...) {
		if err := s.ext4Rows(); err != nil {
			return nil, nil, err
		}
	}
	if len(s.rows) == 0 {
		return nil, nil, fmt.Errorf("no rows match -only %s", strings.Join(c.Only, ","))
	}
	return s.rows, s.vols, nil
}

// rawRows: the engine volume's device against the limit device, and with
// -cold the read rows with the engine's cache dropped.
func (s *rowSet) rawRows(limit *target) error {
	c, e := s.c, s.e
	v, cd, err := e.cowDevice(s.ctx, "fresh", c.Size)
	if err != nil {
		return err
	}
	s.vols = append(s.vols, v)
	if err := s.fill("cowcsi", cd.Path, c.Size); err != nil {
		return err
	}
	if err := checkFlush(cd.Path, v); err != nil {
		return err
	}
	s.fourRows("raw", "", limit, &target{name: "cowcsi", path: cd.Path, size: c.Size, vol: v})
	if !c.Cold {
		return nil
	}
	// Data the engine reads through the page cache is served from
	// memory, which the limit (direct I/O) never uses. The cold rows drop
	// the cached pages of this volume's layer (the only one in the store
	// at this point) before each run.
	layers, err := layerFiles(e.dir)
	if err != nil {
		return err
	}
	cold := &target{name: "cowcsi, cache dropped", path: cd.Path, size: c.Size, vol: v}
	cold.prep = func(context.Context, int) (string, func() error, error) {
		return cd.Path, nil, dropCache(e.dir, layers)
	}
	s.add("raw-1m-read-cold", "1M seq read, engine cache dropped", seqRead, 0.8, limit, cold)
	s.add("raw-4k-randread-cold", "4k randread, engine cache dropped", randRead, 0.5, limit, cold)
	return nil
}

// snapRow: random writes right after a snapshot against the limit's.
func (s *rowSet) snapRow(limit *target) error {
	c, e := s.c, s.e
	v, cd, err := e.cowDevice(s.ctx, "snap", c.Size)
	if err != nil {
		return err
	}
	s.vols = append(s.vols, v)
	// Each run writes every block at most once (fio's random map), right
	// after a snapshot: every write is the first one to its block in the
	// new head, against the limit's random writes.
	snap := &target{name: "cowcsi after snapshot", path: cd.Path, size: c.Size, vol: v}
	snap.prep = func(ctx context.Context, round int) (string, func() error, error) {
		_, err := e.store.CreateSnapshot(ctx, cow.SnapshotSpec{ID: fmt.Sprintf("snap-%d", round), VolumeID: "snap"})
		return cd.Path, nil, err
	}
	s.add("snap-4k-randwrite", "4k randwrite, first write after snapshot", randWrite, 0.35, limit, snap)
	return nil
}

// depthRows: random reads of a volume c.Depth layers deep against a volume
// one layer deep, warm and, with -cold, with all caches dropped.
func (s *rowSet) depthRows() error {
	c, e := s.c, s.e
	layersBefore, err := layerFiles(e.dir)
	if err != nil {
		return err
	}
	fv, fd, err := e.cowDevice(s.ctx, "flat", c.DepthSize)
	if err != nil {
		return err
	}
	dv, dd, err := e.cowDevice(s.ctx, "deep", c.DepthSize)
	if err != nil {
		return err
	}
	s.vols = append(s.vols, fv, dv)
	for _, x := range []struct{ n, p string }{{"flat", fd.Path}, {"deep", dd.Path}} {
		if err := s.fill(x.n, x.p, c.DepthSize); err != nil {
			return err
		}
	}
	if err := deepen(s.ctx, e.store, dv, "deep", c.Depth); err != nil {
		return err
	}
	// The two volumes' layer files: deepen's small writes went through
	// the page cache, fill's large ones past it, and warm drops these
	// before each run so that both sides read from disk.
	layersAfter, err := layerFiles(e.dir)
	if err != nil {
		return err
	}
	depthLayers := slices.DeleteFunc(layersAfter, func(p string) bool { return slices.Contains(layersBefore, p) })
	a := &target{name: "cowcsi depth 1", path: fd.Path, size: c.DepthSize, vol: fv, prep: warm(e.dir, depthLayers, fv, fd.Path, c.DepthSize)}
	b := &target{name: fmt.Sprintf("cowcsi depth %d", c.Depth), path: dd.Path, size: c.DepthSize, vol: dv, prep: warm(e.dir, depthLayers, dv, dd.Path, c.DepthSize)}
	s.add("depth-4k-randread", fmt.Sprintf("4k randread, depth %d vs 1", c.Depth), randRead, 0.9, a, b)
	if !c.Cold {
		return nil
	}
	// The same reads from disk: each side's run starts with the
	// machine's page cache, dentries and inodes dropped (both sides are
	// cowcsi volumes, so nothing else is measured here), file system
	// metadata included: depth 64 reads 64 layer files' extent trees
	// where depth 1 reads one (docs/DECISIONS.md, "bench-io: the cold
	// depth row drops every cache").
	cold := func(name, path string, v *countingVolume) *target {
		t := &target{name: name + ", caches dropped", path: path, size: c.DepthSize, vol: v}
		t.prep = func(context.Context, int) (string, func() error, error) {
			return path, nil, dropAllCaches(e.dir)
		}
		return t
	}
	s.add("depth-4k-randread-cold", fmt.Sprintf("4k randread, depth %d vs 1, caches dropped", c.Depth), randRead, 0.9,
		cold(a.name, fd.Path, fv), cold(b.name, dd.Path, dv))
	return nil
}

// ext4Rows: fio on a file in ext4 on each side's device.
func (s *rowSet) ext4Rows() error {
	c, e := s.c, s.e
	ld, err := e.limitDevice(s.ctx, "limit-fs", c.FSSize)
	if err != nil {
		return err
	}
	v, cd, err := e.cowDevice(s.ctx, "fs", c.FSSize)
	if err != nil {
		return err
	}
	s.vols = append(s.vols, v)
	lm, err := e.mountExt4(s.ctx, ld.Path, "limit")
	if err != nil {
		return err
	}
	cm, err := e.mountExt4(s.ctx, cd.Path, "cowcsi")
	if err != nil {
		return err
	}
	lf, cf := filepath.Join(lm, "fio.dat"), filepath.Join(cm, "fio.dat")
	for _, x := range []struct{ n, p string }{{"ext4 on limit", lf}, {"ext4 on cowcsi", cf}} {
		if err := s.fill(x.n, x.p, c.FileSize); err != nil {
			return err
		}
	}
	s.fourRows("ext4", "ext4: ", &target{name: "ext4 on limit", path: lf, size: c.FileSize},
		&target{name: "ext4 on cowcsi", path: cf, size: c.FileSize, vol: v})
	return nil
}
