package main

import (
	"compress/gzip"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/cowcsi/cowcsi/cow/fusefs"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// fullBench says whether the tests that run the benchmarks at length run:
// every row of TestSmoke, and TestAB. make bench-io-check sets it; make
// test runs a cheap TestSmoke only.
func fullBench() bool { return os.Getenv("COWCSI_BENCH_IO") != "" }

// TestSmoke runs rows once with tiny sizes and short runs: the tool that
// guards the data path's speed must itself keep working. Without
// COWCSI_BENCH_IO it runs one raw row (warm and cold) and one ext4 row;
// with it, every row. It checks that each row measured both sides (fio
// verified the data of each run) and that the report is complete; the
// figures themselves mean nothing at this size.
func TestSmoke(t *testing.T) {
	testutil.RequireRoot(t)
	if testing.Short() {
		t.Skip("-short")
	}
	if _, err := exec.LookPath("fio"); err != nil {
		t.Fatal("fio is not installed (test/install-deps.sh installs it)")
	}
	dir := t.TempDir()
	c := config{
		Dir:        filepath.Join(dir, "work"),
		Out:        filepath.Join(dir, "out.json"),
		Rounds:     1,
		Runtime:    time.Second,
		Size:       128 << 20,
		DepthSize:  64 << 20,
		Depth:      4,
		FSSize:     256 << 20,
		FileSize:   64 << 20,
		EndFsync:   true,
		Cold:       true,
		MemProfile: filepath.Join(dir, "heap.pprof"),
		// The comparison after a run: a baseline no round can be below.
		Baseline: []string{writeReport(t, "baseline.json", map[string][]float64{"raw-4k-randread": {0}})},
	}
	// The driver's default transport where the kernel has it.
	c.IOURing = fusefs.IOURingSupported()
	// Every row, or one of the raw group (with its cold twin) and one of ext4.
	wantIDs := []string{"raw-1m-write", "raw-4k-randread", "raw-4k-randwrite", "raw-4k-randread-cold", "depth-4k-randread", "depth-4k-randread-cold"}
	minRows := 8 // the raw, snapshot, depth and ext4 groups
	if !fullBench() {
		c.Only = []string{"raw-4k-randread", "ext4-4k-randread"}
		wantIDs = []string{"raw-4k-randread", "raw-4k-randread-cold", "ext4-4k-randread"}
		minRows = len(wantIDs)
	}
	if err := run(t.Context(), c); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(c.Out)
	if err != nil {
		t.Fatal(err)
	}
	// The heap profile: pprof's format is a gzipped protocol buffer.
	if f, err := os.Open(c.MemProfile); err != nil {
		t.Error(err)
	} else {
		zr, err := gzip.NewReader(f)
		if err != nil {
			t.Errorf("heap profile: %v", err)
		} else if n, err := io.Copy(io.Discard, zr); err != nil || n == 0 {
			t.Errorf("heap profile: %d bytes, %v", n, err)
		}
		f.Close()
	}
	var rep struct {
		Rows []struct {
			ID     string    `json:"id"`
			Ratios []float64 `json:"ratios"`
			CPU    []float64 `json:"cpu_per_io_ratios"`
			AMed   float64   `json:"a_median"`
			BMed   float64   `json:"b_median"`
		} `json:"rows"`
		RSS json.RawMessage `json:"rss"`
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{}
	for _, id := range wantIDs {
		want[id] = true
	}
	for _, r := range rep.Rows {
		delete(want, r.ID)
		if len(r.Ratios) != 1 || r.AMed <= 0 || r.BMed <= 0 {
			t.Errorf("row %s: medians %v / %v, ratios %v; want both sides measured once", r.ID, r.AMed, r.BMed, r.Ratios)
		}
		if len(r.CPU) != 1 || r.CPU[0] <= 0 {
			t.Errorf("row %s: CPU per I/O ratios %v; want one, positive", r.ID, r.CPU)
		}
	}
	if len(want) > 0 {
		t.Errorf("rows missing: %v (got %d rows)", want, len(rep.Rows))
	}
	if len(rep.Rows) < minRows {
		t.Errorf("%d rows; want at least %d", len(rep.Rows), minRows)
	}
	if len(rep.RSS) == 0 || string(rep.RSS) == "null" {
		t.Error("no RSS figures in the report")
	}
	var rss rssStats
	if err := json.Unmarshal(rep.RSS, &rss); err != nil {
		t.Fatal(err)
	}
	if rss.AnonMedian <= 0 || rss.AnonMedian > rss.MedianUnderLoad || rss.FileMedian > rss.MedianUnderLoad {
		t.Errorf("RSS median %d bytes, of it anonymous %d and file-backed %d", rss.MedianUnderLoad, rss.AnonMedian, rss.FileMedian)
	}
	if _, err := os.Stat(c.Dir); !os.IsNotExist(err) {
		t.Errorf("work directory left behind: %v", err)
	}
}
