package main

import (
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

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
