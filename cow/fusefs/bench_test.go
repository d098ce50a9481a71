package fusefs

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cowcsi/cowcsi/cow/loopdev"
	"github.com/cowcsi/cowcsi/test/testutil"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// fileBlock is a BlockFile on a plain file opened O_DIRECT: the FUSE and
// loop overhead measured against a loop device on a plain file, without an
// engine in between and without the page cache flattering either side.
type fileBlock struct {
	f    *os.File
	size int64
}

func (b *fileBlock) ReadAt(p []byte, off int64) (int, error)  { return b.f.ReadAt(p, off) }
func (b *fileBlock) WriteAt(p []byte, off int64) (int, error) { return b.f.WriteAt(p, off) }
func (b *fileBlock) Flush() error                             { return unix.Fdatasync(int(b.f.Fd())) }
func (b *fileBlock) Size() int64                              { return b.size }
func (b *fileBlock) Discard(off, length int64) error {
	return unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

type fioJob struct {
	name, rw string
	bs       string
}

var fioJobs = []fioJob{
	{"4k randread", "randread", "4k"},
	{"4k randwrite", "randwrite", "4k"},
	{"1M read", "read", "1M"},
	{"1M write", "write", "1M"},
}

// fio runs one job against dev and returns IOPS.
func fio(t *testing.T, ctx context.Context, dev string, j fioJob, runtime time.Duration) float64 {
	t.Helper()
	out, err := exec.CommandContext(ctx, "fio", "--name=bench", "--filename="+dev,
		"--rw="+j.rw, "--bs="+j.bs, "--direct=1", "--ioengine=libaio", "--iodepth=32",
		"--numjobs=1", "--time_based", fmt.Sprintf("--runtime=%ds", int(runtime.Seconds())),
		"--ramp_time=1s", "--randrepeat=0", "--output-format=json").Output()
	if err != nil {
		t.Fatalf("fio %s on %s: %v\n%s", j.name, dev, err, out)
	}
	var res struct {
		Jobs []struct {
			Read, Write struct{ IOPS float64 }
		}
	}
	if err := json.Unmarshal(out[strings.IndexByte(string(out), '{'):], &res); err != nil {
		t.Fatalf("fio output: %v", err)
	}
	return res.Jobs[0].Read.IOPS + res.Jobs[0].Write.IOPS
}

// backingFile creates a fully written file (so that runs measure overwrites,
// not block allocation in the host filesystem).
func backingFile(t *testing.T, ctx context.Context, size int64) string {
	t.Helper()
	dir := t.TempDir()
	if d := os.Getenv("COWCSI_FUSE_BENCH_DIR"); d != "" {
		// e.g. /dev/shm: tmpfs takes the disk's noise out and leaves
		// the CPU cost of the FUSE path, which is what differs.
		var err error
		if dir, err = os.MkdirTemp(d, "fusebench"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(dir) })
	}
	p := filepath.Join(dir, "backing.img")
	run(t, ctx, "fio", "--name=fill", "--filename="+p, "--rw=write", "--bs=1M",
		fmt.Sprintf("--size=%d", size), "--direct=1", "--ioengine=libaio", "--iodepth=8")
	return p
}

// TestMeasure compares loop-on-FUSE configurations with a loop device on a
// plain file. It is slow and only runs with COWCSI_FUSE_BENCH=1 (and fio):
//
//	COWCSI_FUSE_BENCH=1 go test -timeout 30m -run TestMeasure -v ./cow/fusefs
//
// COWCSI_FUSE_BENCH_DIR puts the backing files elsewhere (e.g. /dev/shm);
// COWCSI_FUSE_BENCH_ONLY=sub1,sub2 runs the baseline and matching configs;
// COWCSI_FUSE_BENCH_JOBS=randread,write runs only those fio modes.
func TestMeasure(t *testing.T) {
	if os.Getenv("COWCSI_FUSE_BENCH") == "" {
		t.Skip("set COWCSI_FUSE_BENCH=1 to measure (needs fio)")
	}
	testutil.RequireRoot(t, testutil.DevFUSE)
	if _, err := exec.LookPath("fio"); err != nil {
		t.Skip("needs fio")
	}
	runtime := 10 * time.Second
	const size = 1 << 30
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()

	only := os.Getenv("COWCSI_FUSE_BENCH_ONLY")
	type config struct {
		name    string
		fuse    bool
		opts    Options
		loopDIO bool
	}
	configs := []config{
		{name: "loop on file (baseline)", loopDIO: true},
		{name: "fuse direct_io, loop dio", fuse: true, loopDIO: true},
		{name: "fuse direct_io, loop buffered", fuse: true},
		{name: "fuse page cache, loop dio", fuse: true, opts: Options{PageCache: true}, loopDIO: true},
		{name: "fuse page cache, loop buffered", fuse: true, opts: Options{PageCache: true}},
		{name: "no ASYNC_DIO", fuse: true, loopDIO: true, opts: Options{tune: func(o *fuse.MountOptions) {
			o.ExtraCapabilities = 0
		}}},
		{name: "MaxBackground 12", fuse: true, loopDIO: true, opts: Options{tune: func(o *fuse.MountOptions) {
			o.MaxBackground = 12
		}}},
		{name: "xattrs answered ENODATA", fuse: true, loopDIO: true, opts: Options{tune: func(o *fuse.MountOptions) {
			o.DisableXAttrs = false
			o.IgnoreSecurityLabels = true
		}}},
	}
	var baseline []float64
	var table strings.Builder
	fmt.Fprintf(&table, "%-36s", "config")
	for _, j := range fioJobs {
		fmt.Fprintf(&table, " %16s", j.name)
	}
	table.WriteString("\n")
	for ci, c := range configs {
		if only != "" && ci != 0 && !slices.ContainsFunc(strings.Split(only, ","), func(o string) bool {
			return strings.Contains(c.name, o)
		}) {
			continue
		}
		// Dying mid-run would leave fio hanging on a loop device whose
		// FUSE server is gone: stop early instead.
		if dl, ok := t.Deadline(); ok && time.Until(dl) < 2*time.Minute {
			t.Logf("skipping %q and later configs: test deadline near (use -timeout 30m)", c.name)
			break
		}
		t.Run(c.name, func(t *testing.T) {
			path := backingFile(t, ctx, size)
			if c.fuse {
				s := mount(t, c.opts)
				f, err := os.OpenFile(path, os.O_RDWR|unix.O_DIRECT, 0)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { f.Close() })
				add(t, s, "vol", &fileBlock{f: f, size: size}, false)
				path = s.Path("vol")
			}
			d, err := loopdev.Attach(ctx, path, loopdev.Options{DirectIO: c.loopDIO, LogicalBlockSize: 4096})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := d.Detach(); err != nil {
					t.Errorf("Detach: %v", err)
				}
			})
			fmt.Fprintf(&table, "%-36s", fmt.Sprintf("%s (dio=%v)", c.name, d.DirectIO()))
			for i, j := range fioJobs {
				if jobs := os.Getenv("COWCSI_FUSE_BENCH_JOBS"); jobs != "" && !strings.Contains(jobs, j.rw) {
					if ci == 0 {
						baseline = append(baseline, 0)
					}
					fmt.Fprintf(&table, " %16s", "-")
					continue
				}
				iops := fio(t, ctx, d.Path, j, runtime)
				if ci == 0 {
					baseline = append(baseline, iops)
					fmt.Fprintf(&table, " %16.0f", iops)
				} else {
					fmt.Fprintf(&table, " %9.0f (%.2f)", iops, iops/baseline[i])
				}
			}
			table.WriteString("\n")
		})
	}
	t.Logf("IOPS, fio libaio direct iodepth 32, %v per job; (ratio to baseline)\n%s", runtime, table.String())
}
