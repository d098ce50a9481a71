package main

import (
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// rssSampler records this process's resident set size while the engine is
// under load (this process is the serving process: FUSE server and engine).
type rssSampler struct {
	on       atomic.Pointer[countingVolume] // the volume under load, if any
	mu       sync.Mutex
	samples  []int64 // bytes, taken while on
	anon     []int64 // RssAnon (heap, stacks, ring buffers), sampled with samples
	file     []int64 // RssFile (file-backed mappings: the location arena)
	inflight []int64 // engine calls in progress, sampled with samples
	done     chan struct{}
	wg       sync.WaitGroup
}

type rssStats struct {
	MaxUnderLoad    int64 `json:"max_under_load_bytes"`
	MedianUnderLoad int64 `json:"median_under_load_bytes"`
	// The median split: anonymous memory the kernel cannot reclaim
	// without swap, and file-backed pages it can write back and drop
	// (the engine's location arena, cow/arena.go).
	AnonMedian int64 `json:"anon_median_under_load_bytes"`
	FileMedian int64 `json:"file_median_under_load_bytes"`
	Peak       int64 `json:"peak_bytes"` // VmHWM: over the whole run, setup included
	GoHeapSys  int64 `json:"go_heap_sys_bytes"`
	GoSys      int64 `json:"go_sys_bytes"`
	Samples    int   `json:"samples"`
	// Engine reads and writes in progress at the same samples: the
	// serving process's effective queue depth (fio keeps 32 in flight).
	InflightMedian int64 `json:"inflight_median"`
	InflightMax    int64 `json:"inflight_max"`
}

func newRSSSampler() *rssSampler {
	s := &rssSampler{done: make(chan struct{})}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-s.done:
				return
			case <-t.C:
				v := s.on.Load()
				if v == nil {
					continue
				}
				if rss := procStatus("VmRSS"); rss > 0 {
					anon, file := procStatus("RssAnon"), procStatus("RssFile")
					s.mu.Lock()
					s.samples = append(s.samples, rss)
					s.anon = append(s.anon, anon)
					s.file = append(s.file, file)
					s.inflight = append(s.inflight, v.inflight.Load())
					s.mu.Unlock()
				}
			}
		}
	}()
	return s
}

// active marks v as under load (nil: nothing).
func (s *rssSampler) active(v *countingVolume) { s.on.Store(v) }

func (s *rssSampler) stop() {
	select {
	case <-s.done:
	default:
		close(s.done)
	}
	s.wg.Wait()
}

func (s *rssSampler) stats() rssStats {
	s.mu.Lock()
	xs := slices.Clone(s.samples)
	in := slices.Clone(s.inflight)
	anon, file := slices.Clone(s.anon), slices.Clone(s.file)
	s.mu.Unlock()
	slices.Sort(xs)
	slices.Sort(in)
	slices.Sort(anon)
	slices.Sort(file)
	var st rssStats
	if len(xs) > 0 {
		st.MaxUnderLoad = xs[len(xs)-1]
		st.MedianUnderLoad = xs[len(xs)/2]
		st.InflightMedian, st.InflightMax = in[len(in)/2], in[len(in)-1]
		st.AnonMedian, st.FileMedian = anon[len(anon)/2], file[len(file)/2]
	}
	st.Samples = len(xs)
	st.Peak = procStatus("VmHWM")
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	st.GoHeapSys, st.GoSys = int64(m.HeapSys), int64(m.Sys)
	return st
}

// procStatus returns a "kB" field of /proc/self/status in bytes.
func procStatus(field string) int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n << 10
			}
		}
	}
	return 0
}

// busyCPU is the machine's busy CPU time so far, from /proc/stat: every
// state but idle and iowait, summed over all CPUs. On a 2-vCPU machine a
// row is often bound by CPU rather than by the disk; comparing the CPU per
// I/O of both sides shows where.
func busyCPU() (time.Duration, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	var busy int64
	for i, v := range f[1:] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		if i >= 8 { // guest, guest_nice: already in user, nice
			break
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat: %w", err)
		}
		busy += n
	}
	// USER_HZ is 100 on every Linux architecture Go supports.
	return time.Duration(busy) * 10 * time.Millisecond, nil
}

func printTable(w io.Writer, c config, rows []*row, rss rssStats) {
	fmt.Fprintf(w, "\nfio libaio, direct=1, iodepth=32, numjobs=1, verify=crc32c on every run; 4k reads %v, 1M reads one pass,\n"+
		"writes sized to last about %v then read back and verified; %d rounds, sides alternated; medians, B/A = median of per-round ratios\n\n",
		c.Runtime, c.Runtime, c.Rounds)
	transport := "/dev/fuse"
	if c.IOURing {
		transport = "FUSE over io_uring"
	}
	fmt.Fprintf(w, "cowcsi's FUSE file served through %s\n\n", transport)
	fmt.Fprintf(w, "%-52s %-26s  %-34s  %5s  %-11s  %-12s %7s  %s\n", "row", "A", "B", "B/A", "[min-max]", "target", "cpu B/A", "B end flush")
	for _, r := range rows {
		lo, hi := slices.Min(r.Ratios), slices.Max(r.Ratios)
		mark := "met"
		if r.RMed < r.Target {
			mark = "below"
		}
		flush := ""
		if r.BFlushMed >= 5 {
			flush = fmt.Sprintf("%.2f s", r.BFlushMed/1000)
		}
		fmt.Fprintf(w, "%-52s %-16s %9.0f  %-24s %9.0f  %5.2f  [%.2f-%.2f]  %.2f %-7s %7.2f  %s\n",
			r.Name+" ("+r.Unit+")", r.A, r.AMed, r.B, r.BMed, r.RMed, lo, hi, r.Target, mark, r.CPURatioMed, flush)
	}
	mib := func(b int64) string { return fmt.Sprintf("%.0f MiB", float64(b)/(1<<20)) }
	fmt.Fprintf(w, "\nserving process RSS under load: median %s (anonymous %s, file-backed %s), max %s (%d samples); peak over the run %s; Go heap sys %s\n",
		mib(rss.MedianUnderLoad), mib(rss.AnonMedian), mib(rss.FileMedian), mib(rss.MaxUnderLoad), rss.Samples, mib(rss.Peak), mib(rss.GoHeapSys))
	fmt.Fprintf(w, "engine reads/writes in progress at the same samples: median %d, max %d\n", rss.InflightMedian, rss.InflightMax)
	fmt.Fprintf(w, "cpu B/A: the machine's busy CPU time per I/O during B's runs over A's (median of rounds; /proc/stat)\n")
}
