package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// kind is what one fio run does.
type kind int

const (
	seqWrite kind = iota
	seqRead
	randRead
	randWrite
)

func (k kind) rw() string {
	return [...]string{"write", "read", "randread", "randwrite"}[k]
}

func (k kind) bs() int64 {
	if k == seqWrite || k == seqRead {
		return 1 << 20
	}
	return 4 << 10
}

func (k kind) writes() bool { return k == seqWrite || k == randWrite }

// fioSpec is one fio run on one target.
type fioSpec struct {
	kind    kind
	path    string        // block device or file
	size    int64         // region fio uses
	runtime time.Duration // random read jobs
	// ioBytes bounds write jobs: fio verifies what a job wrote only after
	// its write phase ends by itself (a time_based or runtime-capped job
	// skips verification), so write jobs write a fixed amount, sized from
	// the previous round's rate to last about runtime, then read it all back
	// and check it.
	ioBytes  int64
	endFsync bool
}

// fioResult is what the table needs from fio's JSON.
type fioResult struct {
	IOPS        float64 `json:"iops"`
	BytesPerSec float64 `json:"bytes_per_sec"`
	IOs         int64   `json:"ios"`
	RuntimeMS   int64   `json:"runtime_ms"`
	// VerifiedIOs is the number of blocks fio read back and checked
	// (write jobs: the verify phase; read jobs: every read).
	VerifiedIOs int64   `json:"verified_ios"`
	P50us       float64 `json:"clat_p50_us"`
	P99us       float64 `json:"clat_p99_us"`
	// FlushMS is the time the engine spent in Flush during the run (fio's
	// end_fsync of a write run; fio does not count it in the run's time):
	// what making the run's writes durable cost.
	FlushMS float64 `json:"engine_flush_ms,omitempty"`
	// CPUSec is the machine's busy CPU time (all CPUs, all processes:
	// fio, kernel, and for cowcsi the serving process) during the run.
	CPUSec float64 `json:"cpu_busy_s"`
}

// cpuPerIO is the busy CPU time per I/O of a run (0 if unknown).
func (r fioResult) cpuPerIO() float64 {
	if r.IOs <= 0 {
		return 0
	}
	return r.CPUSec / float64(r.IOs)
}

// runFio runs one job and checks that it verified what it claims to.
//
// Data is checked on every run: write jobs use verify=crc32c with a header
// every 4 KiB (offset, length, CRC32C) and read everything back after the
// write phase; read jobs set the same verify options, which makes fio check
// every block it reads (the device was filled by such writes first), so a
// block served from the wrong offset or layer fails the run.
func runFio(ctx context.Context, workDir, name string, s fioSpec) (fioResult, error) {
	out := filepath.Join(workDir, "fio-"+name+".json")
	args := []string{
		"--name=" + name, "--filename=" + s.path,
		"--rw=" + s.kind.rw(), "--bs=" + strconv.FormatInt(s.kind.bs(), 10),
		"--size=" + strconv.FormatInt(s.size, 10),
		"--direct=1", "--ioengine=libaio", "--iodepth=32", "--numjobs=1",
		"--randrepeat=0",
		"--verify=crc32c", "--verify_interval=4096", "--verify_fatal=1",
		"--output-format=json", "--output=" + out,
	}
	if s.kind.writes() {
		n := s.ioBytes / s.kind.bs() * s.kind.bs()
		if n <= 0 || n > s.size {
			n = s.size / s.kind.bs() * s.kind.bs()
		}
		// A random write job's random map writes each block once, so the
		// verify phase checks the latest version of every block.
		args = append(args, "--io_size="+strconv.FormatInt(n, 10), "--do_verify=1")
		if s.endFsync {
			args = append(args, "--end_fsync=1")
		}
	} else if s.kind == seqRead {
		// One pass over the whole region: a read job with verify set
		// stops at the end of the file instead of wrapping, even when
		// time_based.
		args = append(args, "--io_size="+strconv.FormatInt(s.size, 10))
	} else {
		args = append(args, "--time_based", fmt.Sprintf("--runtime=%dms", s.runtime.Milliseconds()),
			"--ramp_time=1s", "--norandommap")
	}
	cmd := exec.CommandContext(ctx, "fio", args...)
	// fio saves write jobs' verify state files in its working directory.
	cmd.Dir = workDir
	var stderr strings.Builder
	cmd.Stderr = &stderr
	cmd.Stdout = &stderr
	if err := cmd.Run(); err != nil {
		return fioResult{}, fmt.Errorf("fio %s on %s: %w\n%s", name, s.path, err, tail(stderr.String(), 2000))
	}
	defer os.Remove(out)
	b, err := os.ReadFile(out)
	if err != nil {
		return fioResult{}, err
	}
	return parseFio(b, s)
}

type fioDir struct {
	IOPS     float64 `json:"iops"`
	BwBytes  float64 `json:"bw_bytes"`
	TotalIOs int64   `json:"total_ios"`
	Runtime  int64   `json:"runtime"`
	Clat     struct {
		Percentile map[string]float64 `json:"percentile"`
	} `json:"clat_ns"`
}

func parseFio(b []byte, s fioSpec) (fioResult, error) {
	// fio may print notes before the JSON document.
	if i := strings.IndexByte(string(b), '{'); i > 0 {
		b = b[i:]
	}
	var doc struct {
		Jobs []struct {
			Error int    `json:"error"`
			Read  fioDir `json:"read"`
			Write fioDir `json:"write"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return fioResult{}, fmt.Errorf("fio output: %w", err)
	}
	if len(doc.Jobs) != 1 {
		return fioResult{}, fmt.Errorf("fio output: %d jobs, want 1", len(doc.Jobs))
	}
	j := doc.Jobs[0]
	if j.Error != 0 {
		return fioResult{}, fmt.Errorf("fio job error %d", j.Error)
	}
	m, verify := j.Read, j.Read
	if s.kind.writes() {
		m = j.Write
		// The verify phase reads back every write, one read per write.
		if verify.TotalIOs != m.TotalIOs || m.TotalIOs == 0 {
			return fioResult{}, fmt.Errorf("fio verified %d of %d writes", verify.TotalIOs, m.TotalIOs)
		}
	}
	if m.TotalIOs == 0 {
		return fioResult{}, fmt.Errorf("fio did no I/O")
	}
	return fioResult{
		IOPS:        m.IOPS,
		BytesPerSec: m.BwBytes,
		IOs:         m.TotalIOs,
		RuntimeMS:   m.Runtime,
		VerifiedIOs: verify.TotalIOs,
		P50us:       m.Clat.Percentile["50.000000"] / 1000,
		P99us:       m.Clat.Percentile["99.000000"] / 1000,
	}, nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}
