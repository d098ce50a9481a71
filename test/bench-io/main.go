// Command bench-io measures cowcsi's data path against its limit with fio,
// side by side on this machine (docs/BENCHMARKS.md, "Data path (fio)").
//
// The limit is a loop device with direct I/O and 4 KiB logical blocks on a
// plain sparse file. The cowcsi side is exported the way the driver exports
// a volume: engine volume, served as a file by the driver's own FUSE export
// (driver.MountFuseExport), under a loop device with direct I/O and 4 KiB
// logical blocks; this process is the serving process. Each row runs both sides one after the other, the order
// alternating between rounds, and reports medians and the median of the
// per-round ratios. Every fio run verifies data (see runFio).
//
// It needs root, /dev/fuse, loop devices, fio and mkfs.ext4:
//
//	make bench-io                     # or:
//	go run ./test/bench-io -rounds 3 -runtime 10s -out /var/tmp/bench-io.json
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow"
	"github.com/cowcsi/cowcsi/cow/fusefs"
)

type config struct {
	Dir        string        `json:"dir"`
	Out        string        `json:"-"`
	Rounds     int           `json:"rounds"`
	Runtime    time.Duration `json:"runtime_ns"`
	Size       int64         `json:"raw_size"`
	DepthSize  int64         `json:"depth_size"`
	Depth      int           `json:"depth"`
	FSSize     int64         `json:"fs_size"`
	FileSize   int64         `json:"fs_file_size"`
	EndFsync   bool          `json:"end_fsync"`
	Cold       bool          `json:"cold"`
	Only       []string      `json:"only,omitempty"`
	CPUProfile string        `json:"-"`
	MemProfile string        `json:"-"`
	Baseline   []string      `json:"-"`
	IOURing    bool          `json:"fuse_io_uring"`
}

func main() {
	var c config
	var only string
	flag.StringVar(&c.Dir, "dir", "/var/tmp/cowcsi-bench-io", "work directory (removed first and at the end); must be on the filesystem to measure")
	flag.StringVar(&c.Out, "out", "/var/tmp/cowcsi-bench-io.json", "where to write the JSON results")
	flag.IntVar(&c.Rounds, "rounds", 3, "rounds; each runs every row once per side")
	flag.DurationVar(&c.Runtime, "runtime", 10*time.Second, "duration of a read run; write runs are sized to last about as long")
	size := flag.String("size", "8G", "size of the raw devices and of the snapshot volume (a 1 MiB write or read run is one pass over it)")
	depthSize := flag.String("depth-size", "1G", "size of the depth-1 and deep volumes")
	flag.IntVar(&c.Depth, "depth", 64, "layers in the deep volume's chain")
	fsSize := flag.String("fs-size", "8G", "size of the devices under ext4")
	fileSize := flag.String("file-size", "6G", "size of fio's file in each ext4 mount (a 1 MiB write or read run is one pass over it)")
	flag.BoolVar(&c.EndFsync, "end-fsync", true, "write runs end with an fsync, counted in their time (the engine writes small writes through the page cache, the limit does not)")
	flag.BoolVar(&c.Cold, "cold", false, "also run the raw read rows with the engine's layer files dropped from the page cache before each run, and the depth row with all caches dropped (drop_caches)")
	flag.StringVar(&only, "only", "", "comma-separated row groups or row IDs to run (raw, snap, depth, ext4, raw-4k-randread, ...)")
	flag.StringVar(&c.CPUProfile, "cpuprofile", "", "write a CPU profile of the serving process over all rounds")
	flag.StringVar(&c.MemProfile, "memprofile", "", "write a heap profile of the serving process after the last round, its volumes still open (go tool pprof -sample_index=inuse_space)")
	// The driver's default (--fuse-io-uring=auto): the ring where the
	// kernel has it.
	flag.BoolVar(&c.IOURing, "fuse-io-uring", fusefs.IOURingSupported(), "serve the FUSE file through FUSE over io_uring, as the driver does by default where the kernel has it (turns on the fuse module's enable_uring parameter); false: /dev/fuse")
	baseline := flag.String("baseline", "", "comma-separated JSON reports of earlier runs (the old code): after the run, compare each row's rounds with theirs (see -compare)")
	compare := flag.Bool("compare", false, "run nothing: compare the reports OLD[,OLD...] with NEW[,NEW...] (the two arguments), row by row; exit status 1 if every new round of a row lies below every old one")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: bench-io [flags]\n       bench-io -compare OLD.json[,OLD.json...] NEW.json[,NEW.json...]\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if *compare {
		if flag.NArg() != 2 {
			flag.Usage()
			os.Exit(2)
		}
		lower, err := compareReports(os.Stdout, strings.Split(flag.Arg(0), ","), strings.Split(flag.Arg(1), ","))
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench-io:", err)
			os.Exit(2)
		}
		if len(lower) > 0 {
			fmt.Fprintln(os.Stderr, "bench-io: lower than the old code in every round:", strings.Join(lower, ", "))
			os.Exit(1)
		}
		return
	}
	if flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}
	if *baseline != "" {
		c.Baseline = strings.Split(*baseline, ",")
		// Unreadable reports fail now, not after a run of many minutes.
		if _, _, err := loadPooled(c.Baseline); err != nil {
			fmt.Fprintln(os.Stderr, "bench-io: -baseline:", err)
			os.Exit(2)
		}
	}
	for _, p := range []struct {
		s   string
		dst *int64
	}{{*size, &c.Size}, {*depthSize, &c.DepthSize}, {*fsSize, &c.FSSize}, {*fileSize, &c.FileSize}} {
		n, err := parseSize(p.s)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench-io:", err)
			os.Exit(2)
		}
		*p.dst = n
	}
	if only != "" {
		c.Only = strings.Split(only, ",")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, c); err != nil {
		fmt.Fprintln(os.Stderr, "bench-io: FAILED:", err)
		os.Exit(1)
	}
}

func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch {
	case strings.HasSuffix(s, "G"):
		mult, s = 1<<30, strings.TrimSuffix(s, "G")
	case strings.HasSuffix(s, "M"):
		mult, s = 1<<20, strings.TrimSuffix(s, "M")
	}
	var n int64
	if _, err := fmt.Sscan(s, &n); err != nil || n <= 0 {
		return 0, fmt.Errorf("bad size %q", s)
	}
	return n * mult, nil
}

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

type report struct {
	Command  string    `json:"command"`
	Date     time.Time `json:"date"`
	Kernel   string    `json:"kernel"`
	CPUs     int       `json:"cpus"`
	Go       string    `json:"go"`
	Config   config    `json:"config"`
	Rows     []*row    `json:"rows"`
	RSS      rssStats  `json:"rss"`
	Flushes  int64     `json:"engine_flushes"`
	Duration string    `json:"duration"`
}

func run(ctx context.Context, c config) error {
	start := time.Now()
	if os.Geteuid() != 0 {
		return errors.New("needs root (FUSE mount, loop devices, mkfs)")
	}
	e, err := newEnv(ctx, c.Dir, c.IOURing)
	if err != nil {
		return err
	}
	defer func() {
		if err := e.close(); err != nil {
			fmt.Fprintln(os.Stderr, "bench-io: cleanup:", err)
		}
	}()
	rows, vols, err := setup(ctx, c, e)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "setup done in %v\n", time.Since(start).Round(time.Second))
	rss := newRSSSampler()
	defer rss.stop()
	if c.CPUProfile != "" {
		f, err := os.Create(c.CPUProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	est := map[string]float64{} // bytes/s of the last run, by row and side
	for round := range c.Rounds {
		for i, r := range rows {
			sides := []*target{r.a, r.b}
			if (round+i)%2 == 1 {
				sides = []*target{r.b, r.a}
			}
			var got [2]fioResult
			for _, t := range sides {
				res, err := measure(ctx, c, e, r, t, round, est, rss)
				if err != nil {
					return fmt.Errorf("round %d, %s, %s: %w", round+1, r.Name, t.name, err)
				}
				est[r.ID+"/"+t.name] = res.BytesPerSec
				if t == r.a {
					got[0] = res
				} else {
					got[1] = res
				}
				flush := ""
				if res.FlushMS > 0 {
					flush = fmt.Sprintf(", engine flush %.2f s", res.FlushMS/1000)
				}
				fmt.Fprintf(os.Stderr, "[%v] round %d/%d %-44s %-22s %10.0f %s (%d I/Os, %.1f s%s)\n",
					time.Since(start).Round(time.Second), round+1, c.Rounds, r.Name, t.name,
					r.value(res), r.Unit, res.IOs, float64(res.RuntimeMS)/1000, flush)
			}
			r.ARuns = append(r.ARuns, got[0])
			r.BRuns = append(r.BRuns, got[1])
			r.Ratios = append(r.Ratios, r.value(got[1])/r.value(got[0]))
			if a := got[0].cpuPerIO(); a > 0 {
				r.CPURatios = append(r.CPURatios, got[1].cpuPerIO()/a)
			}
		}
	}
	pprof.StopCPUProfile()
	if c.MemProfile != "" {
		if err := writeHeapProfile(c.MemProfile); err != nil {
			return err
		}
	}
	for _, v := range vols {
		if err := checkFlushAgain(v); err != nil {
			return err
		}
	}
	rep := summarize(c, rows, vols, rss, start)
	printTable(os.Stdout, c, rows, rep.RSS)
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(c.Out, append(b, '\n'), 0o644); err != nil {
		return err
	}
	fmt.Printf("\nJSON: %s (%v)\n", c.Out, time.Since(start).Round(time.Second))
	if len(c.Baseline) > 0 {
		lower, err := compareReports(os.Stdout, c.Baseline, []string{c.Out})
		if err != nil {
			return fmt.Errorf("baseline: %w", err)
		}
		if len(lower) > 0 {
			return fmt.Errorf("lower than the baseline in every round: %s", strings.Join(lower, ", "))
		}
	}
	return nil
}

// measure runs one row on one side.
func measure(ctx context.Context, c config, e *env, r *row, t *target, round int, est map[string]float64, rss *rssSampler) (fioResult, error) {
	path := t.path
	tPrep := time.Now()
	defer func() {
		if d := time.Since(tPrep); d > 2*c.Runtime+20*time.Second {
			fmt.Fprintf(os.Stderr, "slow: %s on %s took %v in all\n", r.ID, t.name, d.Round(100*time.Millisecond))
		}
	}()
	if t.prep != nil {
		p, undo, err := t.prep(ctx, round)
		if err != nil {
			return fioResult{}, err
		}
		if undo != nil {
			defer undo()
		}
		path = p
	}
	if d := time.Since(tPrep); d > 2*time.Second {
		fmt.Fprintf(os.Stderr, "prep of %s on %s took %v\n", r.ID, t.name, d.Round(100*time.Millisecond))
	}
	t0 := time.Now()
	if err := syncfs(e.dir); err != nil {
		return fioResult{}, err
	}
	if d := time.Since(t0); d > 2*time.Second {
		fmt.Fprintf(os.Stderr, "syncfs before %s on %s took %v\n", r.ID, t.name, d.Round(100*time.Millisecond))
	}
	spec := fioSpec{kind: r.kind, path: path, size: t.size, runtime: c.Runtime, endFsync: c.EndFsync}
	if r.kind == randWrite {
		rate := est[r.ID+"/"+t.name]
		if rate == 0 {
			rate = est[r.group()+"-4k-randread/"+t.name]
		}
		if rate == 0 {
			rate = 15000 * 4096
		}
		spec.ioBytes = int64(rate * c.Runtime.Seconds())
	}
	cpu0, err := busyCPU()
	if err != nil {
		return fioResult{}, err
	}
	withCPU := func(res fioResult, err error) (fioResult, error) {
		cpu1, cerr := busyCPU()
		if err == nil {
			err = cerr
		}
		res.CPUSec = (cpu1 - cpu0).Seconds()
		return res, err
	}
	if t.vol == nil {
		return withCPU(runFio(ctx, e.dir, r.ID, spec))
	}
	rss.active(t.vol)
	defer rss.active(nil)
	flushes, flushNS := t.vol.flushes.Load(), t.vol.flushNS.Load()
	res, err := withCPU(runFio(ctx, e.dir, r.ID, spec))
	if err == nil && spec.kind.writes() && spec.endFsync && t.vol.flushes.Load() == flushes {
		err = fmt.Errorf("fio's end_fsync did not reach Volume.Flush")
	}
	res.FlushMS = float64(t.vol.flushNS.Load()-flushNS) / 1e6
	return res, err
}

// setup creates the devices of the wanted rows and fills them with data fio
// can verify (a header every 4 KiB).
func setup(ctx context.Context, c config, e *env) ([]*row, []*countingVolume, error) {
	var rows []*row
	var vols []*countingVolume
	fill := func(name, path string, size int64) error {
		t0 := time.Now()
		_, err := runFio(ctx, e.dir, "fill-"+name, fioSpec{kind: seqWrite, path: path, size: size})
		fmt.Fprintf(os.Stderr, "filled %s (%d MiB) in %v\n", name, size>>20, time.Since(t0).Round(100*time.Millisecond))
		return err
	}
	add := func(id, name string, k kind, target float64, a, b *target) {
		if !wanted(c, id) {
			return
		}
		unit := "IOPS"
		if k.bs() >= 1<<20 {
			unit = "MB/s"
		}
		rows = append(rows, &row{ID: id, Name: name, Unit: unit, A: a.name, B: b.name, Target: target, kind: k, a: a, b: b})
	}
	fourRows := func(group, prefix string, a, b *target) {
		add(group+"-1m-write", prefix+"1M seq write", seqWrite, 0.8, a, b)
		add(group+"-1m-read", prefix+"1M seq read", seqRead, 0.8, a, b)
		add(group+"-4k-randread", prefix+"4k randread", randRead, 0.5, a, b)
		add(group+"-4k-randwrite", prefix+"4k randwrite", randWrite, 0.5, a, b)
	}
	rawIDs := []string{"raw-1m-write", "raw-1m-read", "raw-4k-randread", "raw-4k-randwrite"}
	coldIDs := []string{"raw-1m-read-cold", "raw-4k-randread-cold"}
	ext4IDs := []string{"ext4-1m-write", "ext4-1m-read", "ext4-4k-randread", "ext4-4k-randwrite"}

	var limit *target
	if wanted(c, rawIDs...) || (c.Cold && wanted(c, coldIDs...)) || wanted(c, "snap-4k-randwrite") {
		ld, err := e.limitDevice(ctx, "limit", c.Size)
		if err != nil {
			return nil, nil, err
		}
		if err := fill("limit", ld.Path, c.Size); err != nil {
			return nil, nil, err
		}
		limit = &target{name: "limit", path: ld.Path, size: c.Size}
	}

	if wanted(c, rawIDs...) || (c.Cold && wanted(c, coldIDs...)) {
		v, cd, err := e.cowDevice(ctx, "fresh", c.Size)
		if err != nil {
			return nil, nil, err
		}
		vols = append(vols, v)
		if err := fill("cowcsi", cd.Path, c.Size); err != nil {
			return nil, nil, err
		}
		if err := checkFlush(cd.Path, v); err != nil {
			return nil, nil, err
		}
		fourRows("raw", "", limit, &target{name: "cowcsi", path: cd.Path, size: c.Size, vol: v})
		if c.Cold {
			// Data the engine reads through the page cache is served
			// from memory, which the limit (direct I/O) never uses. The
			// cold rows drop the cached pages of this volume's layer
			// (the only one in the store at this point) before each run.
			layers, err := layerFiles(e.dir)
			if err != nil {
				return nil, nil, err
			}
			cold := &target{name: "cowcsi, cache dropped", path: cd.Path, size: c.Size, vol: v}
			cold.prep = func(context.Context, int) (string, func() error, error) {
				return cd.Path, nil, dropCache(e.dir, layers)
			}
			add("raw-1m-read-cold", "1M seq read, engine cache dropped", seqRead, 0.8, limit, cold)
			add("raw-4k-randread-cold", "4k randread, engine cache dropped", randRead, 0.5, limit, cold)
		}
	}

	if wanted(c, "snap-4k-randwrite") {
		v, cd, err := e.cowDevice(ctx, "snap", c.Size)
		if err != nil {
			return nil, nil, err
		}
		vols = append(vols, v)
		// Each run writes every block at most once (fio's random map),
		// right after a snapshot: every write is the first one to its
		// block in the new head, against the limit's random writes.
		snap := &target{name: "cowcsi after snapshot", path: cd.Path, size: c.Size, vol: v}
		snap.prep = func(ctx context.Context, round int) (string, func() error, error) {
			_, err := e.store.CreateSnapshot(ctx, cow.SnapshotSpec{ID: fmt.Sprintf("snap-%d", round), VolumeID: "snap"})
			return cd.Path, nil, err
		}
		add("snap-4k-randwrite", "4k randwrite, first write after snapshot", randWrite, 0.35, limit, snap)
	}

	if wanted(c, "depth-4k-randread") || (c.Cold && wanted(c, "depth-4k-randread-cold")) {
		layersBefore, err := layerFiles(e.dir)
		if err != nil {
			return nil, nil, err
		}
		fv, fd, err := e.cowDevice(ctx, "flat", c.DepthSize)
		if err != nil {
			return nil, nil, err
		}
		dv, dd, err := e.cowDevice(ctx, "deep", c.DepthSize)
		if err != nil {
			return nil, nil, err
		}
		vols = append(vols, fv, dv)
		for _, x := range []struct{ n, p string }{{"flat", fd.Path}, {"deep", dd.Path}} {
			if err := fill(x.n, x.p, c.DepthSize); err != nil {
				return nil, nil, err
			}
		}
		if err := deepen(ctx, e.store, dv, "deep", c.Depth); err != nil {
			return nil, nil, err
		}
		// The two volumes' layer files: deepen's small writes went
		// through the page cache, fill's large ones past it, and warm
		// drops these before each run so that both sides read from disk.
		layersAfter, err := layerFiles(e.dir)
		if err != nil {
			return nil, nil, err
		}
		depthLayers := slices.DeleteFunc(layersAfter, func(p string) bool { return slices.Contains(layersBefore, p) })
		a := &target{name: "cowcsi depth 1", path: fd.Path, size: c.DepthSize, vol: fv, prep: warm(e.dir, depthLayers, fv, fd.Path, c.DepthSize)}
		b := &target{name: fmt.Sprintf("cowcsi depth %d", c.Depth), path: dd.Path, size: c.DepthSize, vol: dv, prep: warm(e.dir, depthLayers, dv, dd.Path, c.DepthSize)}
		add("depth-4k-randread", fmt.Sprintf("4k randread, depth %d vs 1", c.Depth), randRead, 0.9, a, b)
		if c.Cold {
			// The same reads from disk: each side's run starts with
			// the machine's page cache, dentries and inodes dropped
			// (both sides are cowcsi volumes, so nothing else is
			// measured here), file system metadata included: depth
			// 64 reads 64 layer files' extent trees where depth 1
			// reads one. Dropping only the layer files' data pages
			// left their extent trees cached.
			cold := func(name, path string, v *countingVolume) *target {
				t := &target{name: name + ", caches dropped", path: path, size: c.DepthSize, vol: v}
				t.prep = func(context.Context, int) (string, func() error, error) {
					return path, nil, dropAllCaches(e.dir)
				}
				return t
			}
			add("depth-4k-randread-cold", fmt.Sprintf("4k randread, depth %d vs 1, caches dropped", c.Depth), randRead, 0.9,
				cold(a.name, fd.Path, fv), cold(b.name, dd.Path, dv))
		}
	}

	if wanted(c, ext4IDs...) {
		ld, err := e.limitDevice(ctx, "limit-fs", c.FSSize)
		if err != nil {
			return nil, nil, err
		}
		v, cd, err := e.cowDevice(ctx, "fs", c.FSSize)
		if err != nil {
			return nil, nil, err
		}
		vols = append(vols, v)
		lm, err := e.mountExt4(ctx, ld.Path, "limit")
		if err != nil {
			return nil, nil, err
		}
		cm, err := e.mountExt4(ctx, cd.Path, "cowcsi")
		if err != nil {
			return nil, nil, err
		}
		lf, cf := filepath.Join(lm, "fio.dat"), filepath.Join(cm, "fio.dat")
		for _, x := range []struct{ n, p string }{{"ext4 on limit", lf}, {"ext4 on cowcsi", cf}} {
			if err := fill(x.n, x.p, c.FileSize); err != nil {
				return nil, nil, err
			}
		}
		fourRows("ext4", "ext4: ", &target{name: "ext4 on limit", path: lf, size: c.FileSize},
			&target{name: "ext4 on cowcsi", path: cf, size: c.FileSize, vol: v})
	}
	if len(rows) == 0 {
		return nil, nil, fmt.Errorf("no rows match -only %s", strings.Join(c.Only, ","))
	}
	return rows, vols, nil
}

// warm returns a prep that drops the page cache of layers (the depth
// volumes' layer files) and then reads all of v through the engine, in 64
// KiB reads. The engine's reads from disk leave its page cache alone, so
// this does not put the data in memory: it maps every block of every layer
// file, so that the depth row compares both sides with the file system's
// metadata (the extent trees of the layer files) in memory and the data on
// disk; the cold depth row drops that too. Until 2026-12-05 the deep
// volume's data stayed cached from deepen's writes (small writes go
// through the page cache), and a perf profile of the row showed depth 64
// reading from the cache where depth 1 read from disk. Until reads of
// every size left the cache alone, the row compared reads from the cache,
// and this machine's DAMON pageout scheme (page cache idle for about six
// seconds, 128 MiB/s) paged parts of it out during runs: rounds of depth
// 64 then read 10x slower than depth 1. The reads run warmWorkers at a
// time: the deep volume's 64 KiB are 16 blocks in 16 layer files, and one
// at a time the warm took 1.5-8.5 minutes when the disk was slow.
func warm(dir string, layers []string, v *countingVolume, path string, size int64) func(context.Context, int) (string, func() error, error) {
	return func(context.Context, int) (string, func() error, error) {
		if err := dropCache(dir, layers); err != nil {
			return "", nil, err
		}
		const chunk = 64 << 10
		var next atomic.Int64
		var wg sync.WaitGroup
		errs := make(chan error, warmWorkers)
		for range warmWorkers {
			wg.Go(func() {
				buf := make([]byte, chunk)
				for {
					off := next.Add(chunk) - chunk
					if off >= size {
						return
					}
					if _, err := v.ReadAt(buf[:min(chunk, size-off)], off); err != nil {
						errs <- fmt.Errorf("warm %s: %w", path, err)
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		if err := <-errs; err != nil {
			return "", nil, err
		}
		// Both sides must read from disk: a cached copy of the data
		// would make the row compare memory with disk again.
		cached, total, err := cachedPages(layers)
		if err != nil {
			return "", nil, err
		}
		if cached > total/100 {
			return "", nil, fmt.Errorf("warm %s: %d of %d pages of the layer files cached after the drop and the warm", path, cached, total)
		}
		return path, nil, nil
	}
}

// warmWorkers is how many reads warm has in flight (fio's iodepth).
const warmWorkers = 32

// deepen makes the volume's chain depth layers deep, every layer owning an
// equal share of blocks spread over the whole volume: after each snapshot,
// the blocks whose hash picks this layer are rewritten with their own
// content (so fio's verify headers stay valid).
func deepen(ctx context.Context, st *cow.Store, v *countingVolume, id string, depth int) error {
	t0 := time.Now()
	blocks := uint64(v.Size() / cow.BlockSize)
	buf := make([]byte, cow.BlockSize)
	for k := 1; k < depth; k++ {
		if _, err := st.CreateSnapshot(ctx, cow.SnapshotSpec{ID: fmt.Sprintf("%s-%d", id, k), VolumeID: id}); err != nil {
			return err
		}
		for b := range blocks {
			if int((b*0x9E3779B97F4A7C15)>>32)%depth != k {
				continue
			}
			off := int64(b) * cow.BlockSize
			if _, err := v.ReadAt(buf, off); err != nil {
				return err
			}
			if _, err := v.WriteAt(buf, off); err != nil {
				return err
			}
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
	if err := v.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "deep volume: %d layers in %v\n", depth, time.Since(t0).Round(100*time.Millisecond))
	return nil
}

func checkFlushAgain(v *countingVolume) error {
	if v.flushes.Load() == 0 {
		return fmt.Errorf("volume %s: no Flush reached the engine during the run", v.ID())
	}
	return nil
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func summarize(c config, rows []*row, vols []*countingVolume, rss *rssSampler, start time.Time) report {
	for _, r := range rows {
		var a, b, f []float64
		for i := range r.ARuns {
			a = append(a, r.value(r.ARuns[i]))
			b = append(b, r.value(r.BRuns[i]))
			f = append(f, r.BRuns[i].FlushMS)
		}
		r.AMed, r.BMed, r.RMed, r.BFlushMed = median(a), median(b), median(r.Ratios), median(f)
		r.CPURatioMed = median(r.CPURatios)
	}
	var u unix.Utsname
	_ = unix.Uname(&u)
	var flushes int64
	for _, v := range vols {
		flushes += v.flushes.Load()
	}
	return report{
		Command:  strings.Join(os.Args, " "),
		Date:     start.UTC(),
		Kernel:   unix.ByteSliceToString(u.Release[:]),
		CPUs:     runtime.NumCPU(),
		Go:       runtime.Version(),
		Config:   c,
		Rows:     rows,
		RSS:      rss.stats(),
		Flushes:  flushes,
		Duration: time.Since(start).Round(time.Second).String(),
	}
}

// writeHeapProfile writes the heap profile (after a GC, so in-use figures
// are current) to path.
func writeHeapProfile(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	runtime.GC()
	if err := pprof.WriteHeapProfile(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
