package cow_test

import (
	"errors"
	"fmt"
	"maps"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cowcsi/cowcsi/cow"
	"github.com/cowcsi/cowcsi/cow/internal/faultfs"
)

// TestPowerCut runs the crash test's random workload (crashWorker) in this
// process on a store whose file I/O goes through faultfs, and cuts the
// power at a random change: the store is then reopened from what reached
// the disk (unsynced pages dropped, torn page by page, or kept) and checked
// against the model of what was acknowledged, as after a kill -9. Some
// rounds first make one fdatasync fail with EIO, others make writes fail
// with ENOSPC. Rounds continue on the same store.
//
// COW_POWERCUT_CUTS sets the number of cuts (make powercut-long).
func TestPowerCut(t *testing.T) {
	seed := testSeed(t)
	cuts := scaled(100)
	if v := os.Getenv("COW_POWERCUT_CUTS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			t.Fatalf("COW_POWERCUT_CUTS=%q: want a positive number of cuts", v)
		}
		cuts = n
	}
	rng := rand.New(rand.NewSource(seed))
	base := fastTempDir(t)
	dir := filepath.Join(base, "store0")
	if err := os.MkdirAll(filepath.Join(dir, "layers"), 0o700); err != nil {
		t.Fatal(err)
	}
	m := &crashModel{vols: map[string]*crashVol{}, snaps: map[string][]uint64{}}
	var st powerCutStats
	start := time.Now()
	for round := range cuts {
		next := filepath.Join(base, "store"+strconv.Itoa(round+1))
		pc := &powerCut{t: t, round: round, seed: rng.Int63(), m: m, stats: &st}
		pc.run(dir, next)
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
		dir = next
	}
	el := time.Since(start)
	t.Logf("%d cuts (%d in Open, %d after an fdatasync EIO, %d after ENOSPC; modes drop/tear/keep %v), %d operations acknowledged, %v, %v per cut",
		cuts, st.inOpen, st.eio, st.noSpace, st.modes, st.acks, el.Round(time.Millisecond), (el / time.Duration(cuts)).Round(time.Microsecond))
}

type powerCutStats struct {
	inOpen, eio, noSpace, acks int
	modes                      [3]int
}

// powerCut is one round of TestPowerCut.
type powerCut struct {
	t     *testing.T
	round int
	seed  int64
	m     *crashModel
	stats *powerCutStats
	lines []string
	kind  string // "cut", "eio" or "enospc"
	ff    *faultfs.FS
}

// workerStop is what crashWorker.stop panics with.
type workerStop struct {
	what string
	err  error
}

func (pc *powerCut) fatalf(format string, args ...any) {
	pc.t.Helper()
	pc.t.Fatalf("round %d (seed %d, %s): %s; last lines:\n  %s", pc.round, pc.seed, pc.kind, fmt.Sprintf(format, args...),
		strings.Join(pc.lines[max(0, len(pc.lines)-15):], "\n  "))
}

// run opens the store in dir with faults, runs the workload until the
// power goes, writes the disk after the cut to next and verifies it.
func (pc *powerCut) run(dir, next string) {
	defer func() {
		if pc.t.Failed() {
			pc.t.Logf("round %d (seed %d, %s), lines:\n  %s", pc.round, pc.seed, pc.kind, strings.Join(pc.lines, "\n  "))
		}
	}()
	rng := rand.New(rand.NewSource(pc.seed))
	ff, err := faultfs.New(dir, rng.Int63())
	if err != nil {
		pc.t.Fatal(err)
	}
	pc.ff = ff
	pc.kind = "cut"
	switch r := rng.Intn(10); {
	case r == 0:
		ff.CutAfter(1 + rng.Int63n(8)) // in Open's recovery, or just after
	case r < 3:
		pc.kind = "eio"
		ff.FailSyncAfter(1 + rng.Int63n(40))
	case r < 5:
		pc.kind = "enospc"
		ff.NoSpaceAfter(1+rng.Int63n(60), 1+rng.Int63n(20))
	}
	s, err := cow.Open(dir, cow.Options{Faults: ff, NoBackgroundMerge: true})
	if err == nil {
		if pc.kind == "cut" {
			ff.CutAfter(1 + rng.Int63n(300))
		}
		pc.work(s, rng)
		s.Close()
	} else if !ff.Dead() && pc.kind == "cut" {
		pc.fatalf("Open: %v", err)
	} else {
		pc.stats.inOpen++
	}
	mode := faultfs.CutMode(rng.Intn(3))
	pc.stats.modes[mode]++
	if err := ff.Cut(dir, next, mode); err != nil {
		pc.t.Fatal(err)
	}
	pc.kind += "/" + mode.String()
	pc.verify(next)
}

// work runs the workload on s until an operation fails, then what the
// kind of round asks.
func (pc *powerCut) work(s *cow.Store, rng *rand.Rand) {
	w := &crashWorker{ctx: pc.t.Context(), rng: rng, round: pc.round, gen: uint64(pc.round+1) << 32,
		vols: map[string]*cow.Volume{}, idle: true,
		out:  func(line string) { pc.lines = append(pc.lines, line) },
		stop: func(what string, err error) { panic(workerStop{what, err}) },
	}
	stop := func() (ws workerStop) {
		defer func() {
			r := recover()
			if r == nil {
				return
			}
			var ok bool
			if ws, ok = r.(workerStop); !ok {
				panic(r)
			}
		}()
		w.attach(s)
		w.loop()
		return
	}()
	pc.lines = append(pc.lines, fmt.Sprintf("# stopped: %s: %v (failed syncs %v)", stop.what, stop.err, pc.ff.FailedSyncs()))
	switch pc.kind {
	case "cut":
		if !errors.Is(stop.err, syscall.EIO) {
			pc.fatalf("%s after the power went: %v, want EIO", stop.what, stop.err)
		}
	case "eio":
		if !errors.Is(stop.err, syscall.EIO) {
			pc.fatalf("%s with an fdatasync failing: %v, want EIO", stop.what, stop.err)
		}
		pc.stats.eio++
		pc.probe(w)
	case "enospc":
		if !errors.Is(stop.err, cow.ErrNoSpace) {
			pc.fatalf("%s with writes failing with ENOSPC: %v, want ErrNoSpace", stop.what, stop.err)
		}
		pc.stats.noSpace++
		pc.recoverSpace(s, w, stop)
	}
}

// probe writes a block to every open volume and flushes it, after an
// fdatasync failed: a flush that returns success must have made the block
// durable, whatever failed before.
func (pc *powerCut) probe(w *crashWorker) {
	for _, id := range slices.Sorted(maps.Keys(w.vols)) {
		v := w.vols[id]
		if v.Size() < cow.BlockSize {
			continue
		}
		w.gen++
		buf := make([]byte, cow.BlockSize)
		for i := 0; i < len(buf); i += sectorSize {
			crashSector(buf[i:i+sectorSize], int64(i), w.gen)
		}
		w.emit("write %s 0 %d %d", id, len(buf), w.gen)
		if _, err := v.WriteAt(buf, 0); err != nil {
			if !errors.Is(err, syscall.EIO) && !errors.Is(err, cow.ErrClosed) {
				pc.fatalf("write to %s after an fdatasync EIO: %v, want EIO", id, err)
			}
			continue
		}
		if err := v.Flush(); err == nil {
			w.emit("flush %s", id)
		} else if !errors.Is(err, syscall.EIO) {
			pc.fatalf("flush of %s after an fdatasync EIO: %v, want EIO", id, err)
		}
	}
}

// recoverSpace, once the disk has room again, flushes every volume and
// runs the merges: nothing may have been left broken by the failed writes.
func (pc *powerCut) recoverSpace(s *cow.Store, w *crashWorker, stop workerStop) {
	pc.ff.NoSpaceAfter(1<<40, 0)
	pc.redo(w, stop)
	for _, id := range slices.Sorted(maps.Keys(w.vols)) {
		switch err := w.vols[id].Flush(); {
		case err == nil:
			w.emit("flush %s", id)
		case !errors.Is(err, cow.ErrClosed):
			pc.fatalf("flush of %s once there is room again: %v", id, err)
		}
	}
	if err := s.WaitIdle(pc.t.Context()); err != nil {
		pc.fatalf("WaitIdle once there is room again: %v", err)
	}
	if err := s.Check(); err != nil {
		pc.fatalf("Check after ENOSPC: %v", err)
	}
}

// redo does again the write or zeroing that failed (the model takes a
// flush to make the last write of a block durable, and a failed write
// may have left some of it).
func (pc *powerCut) redo(w *crashWorker, stop workerStop) {
	if stop.what != "WriteAt" && stop.what != "Discard" && stop.what != "WriteZeroes" {
		return
	}
	f := strings.Fields(pc.lines[len(pc.lines)-2]) // its intent, before the "# stopped" line
	id := f[1]
	off, _ := strconv.ParseInt(f[2], 10, 64)
	n, _ := strconv.ParseInt(f[3], 10, 64)
	v := w.vols[id]
	var err error
	if f[0] == "zero" {
		w.emit("zero %s %d %d", id, off, n)
		err = v.Discard(off, n)
	} else {
		w.gen++
		buf := make([]byte, n)
		for i := int64(0); i < n; i += sectorSize {
			crashSector(buf[i:i+sectorSize], off+i, w.gen)
		}
		w.emit("write %s %d %d %d", id, off, n, w.gen)
		_, err = v.WriteAt(buf, off)
	}
	if err != nil {
		pc.fatalf("%s again once there is room (%q): %v", stop.what, f, err)
	}
}

// verify opens the store after the cut, checks it and the model, and
// makes what it read the model's durable state.
func (pc *powerCut) verify(dir string) {
	t := pc.t
	t.Helper()
	for i, line := range pc.lines {
		if strings.HasPrefix(line, "#") {
			continue
		}
		if err := pc.m.apply(line); err != nil {
			pc.fatalf("line %d %q: %v", i, line, err)
		}
		if f := strings.Fields(line); strings.HasSuffix(f[0], "!") || f[0] == "flush" {
			pc.stats.acks++
		}
	}
	s, err := cow.Open(dir, cow.Options{NoBackgroundMerge: true})
	if err != nil {
		pc.fatalf("Open after the cut: %v", err)
	}
	defer s.Close()
	if err := s.Check(); err != nil {
		pc.fatalf("Check after the cut: %v", err)
	}
	if err := pc.m.resolve(s); err != nil {
		pc.fatalf("%v", err)
	}
	pc.m.verify(t, s)
	if t.Failed() {
		pc.fatalf("the store after the cut differs from the model")
	}
	if err := s.Close(); err != nil {
		pc.fatalf("Close: %v", err)
	}
}
