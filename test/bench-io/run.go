package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime/pprof"
	"strings"
	"time"
)

// run sets up the devices of the wanted rows, runs every row c.Rounds
// times on both sides, and writes and checks the report.
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
			if err := runRow(ctx, c, e, r, round, i, est, rss, start); err != nil {
				return err
			}
		}
	}
	pprof.StopCPUProfile()
	return finish(c, rows, vols, rss, start)
}

// runRow runs row r (the i-th) of one round on both sides, the order
// alternating between rounds and rows, and records the results.
func runRow(ctx context.Context, c config, e *env, r *row, round, i int, est map[string]float64, rss *rssSampler, start time.Time) error {
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
	return nil
}

// finish writes the heap profile, checks that flushes reached the engine,
// prints the table, writes the JSON report and compares it with the
// baseline.
func finish(c config, rows []*row, vols []*countingVolume, rss *rssSampler, start time.Time) error {
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

func checkFlushAgain(v *countingVolume) error {
	if v.flushes.Load() == 0 {
		return fmt.Errorf("volume %s: no Flush reached the engine during the run", v.ID())
	}
	return nil
}
