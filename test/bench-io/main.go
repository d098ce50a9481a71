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
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

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
