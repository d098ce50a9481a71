package main

import (
	"bytes"
	"context"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"image/png"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/bench"
	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/report"
	"github.com/cowcsi/cowcsi/cow/loopdev"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// cowbench runs the command in-process and returns its exit code, stdout
// and stderr.
func cowbench(t *testing.T, ctx context.Context, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(ctx, args, &stdout, &stderr)
	t.Logf("cowbench %s: exit %d\nstderr:\n%s", strings.Join(args, " "), code, stderr.String())
	return code, stdout.String(), stderr.String()
}

func readResult(t *testing.T, path string) *bench.Result {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var r bench.Result
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return &r
}

// checkRows asserts that every operation has a row with count > 0 and no
// errors at every size and concurrency level.
func checkRows(t *testing.T, r *bench.Result, ops []string, sizes []string, concs []int) {
	t.Helper()
	type key struct {
		op, size string
		c        int
	}
	rows := map[key]bench.Row{}
	for _, row := range r.Rows {
		rows[key{row.Op, row.Size, row.Concurrency}] = row
	}
	for _, op := range ops {
		for _, s := range sizes {
			for _, c := range concs {
				row, ok := rows[key{op, s, c}]
				switch {
				case !ok:
					t.Errorf("no row for %s %s c=%d", op, s, c)
				case row.Count == 0 || row.Errors != 0:
					t.Errorf("%s %s c=%d: count %d errors %d, want count > 0 and no errors", op, s, c, row.Count, row.Errors)
				case row.P50Ms <= 0 || row.P50Ms > row.P99Ms || row.P99Ms > row.MaxMs:
					t.Errorf("%s %s c=%d: p50 %v p99 %v max %v out of order", op, s, c, row.P50Ms, row.P99Ms, row.MaxMs)
				}
			}
		}
	}
}

var controllerOps = []string{bench.OpCreateVolume, bench.OpCreateSnapshot, bench.OpRestore, bench.OpClone, bench.OpDeleteSnapshot, bench.OpDeleteVolume}

// TestCSIOutputs runs the csi mode against the fake driver, which needs no
// root, and checks every output format.
func TestCSIOutputs(t *testing.T) {
	d := &fakeDriver{snapshots: true, clone: true, notReady: 1}
	ep := serveFake(t, d)
	dir := t.TempDir()
	jsonPath, csvPath, pngPath := filepath.Join(dir, "r.json"), filepath.Join(dir, "r.csv"), filepath.Join(dir, "r.png")
	code, stdout, _ := cowbench(t, t.Context(), "csi", "--endpoint", ep, "--write", "0", "--sizes", "64Mi,1Gi",
		"--snapshots", "2", "--concurrency", "1,3", "--volumes", "3",
		"--output", "table,json="+jsonPath+",csv="+csvPath, "--plot", pngPath)
	if code != exitOK {
		t.Fatalf("exit %d, want 0", code)
	}
	r := readResult(t, jsonPath)
	checkRows(t, r, controllerOps, []string{"64Mi", "1Gi"}, []int{1, 3})
	for _, row := range r.Rows {
		want := 3 // volumes, clones
		switch row.Op {
		case bench.OpCreateSnapshot, bench.OpRestore, bench.OpDeleteSnapshot:
			want = 6
		case bench.OpDeleteVolume:
			want = 3 + 6 + 3
		}
		if row.Count != want {
			t.Errorf("%s %s c=%d: count %d, want %d", row.Op, row.Size, row.Concurrency, row.Count, want)
		}
	}
	if !strings.Contains(strings.Join(r.Notes, "\n"), "ready_to_use=false") {
		t.Errorf("notes %q do not mention the snapshots that were not ready at once", r.Notes)
	}
	if v, s := d.left(); v+s != 0 {
		t.Errorf("%d volumes and %d snapshots left in the driver", v, s)
	}

	for _, want := range []string{"cowbench csi: fake.csi.test v0 at " + ep, "CreateSnapshot", "p99"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("table on stdout lacks %q:\n%s", want, stdout)
		}
	}

	f, err := os.Open(csvPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	recs, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != len(r.Rows)+1 || strings.Join(recs[0], ",") != strings.Join(report.CSVHeader, ",") {
		t.Errorf("CSV has %d lines (header %q), want a header and %d rows", len(recs), recs[0], len(r.Rows))
	}

	pf, err := os.Open(pngPath)
	if err != nil {
		t.Fatal(err)
	}
	defer pf.Close()
	img, err := png.Decode(pf)
	if err != nil {
		t.Fatalf("plot: %v", err)
	}
	if b := img.Bounds(); b.Dx() < 600 || b.Dy() < 300 {
		t.Errorf("plot is %v, too small to read", b)
	}
}

// TestCSICapabilities: without CREATE_DELETE_SNAPSHOT the run stops before
// creating anything; without CLONE_VOLUME it measures the rest and says
// clones were skipped.
func TestCSICapabilities(t *testing.T) {
	t.Run("no snapshots", func(t *testing.T) {
		d := &fakeDriver{}
		ep := serveFake(t, d)
		code, _, stderr := cowbench(t, t.Context(), "csi", "--endpoint", ep, "--write", "0", "--sizes", "1Gi", "--concurrency", "1")
		if code != exitSetup {
			t.Errorf("exit %d, want %d", code, exitSetup)
		}
		if !strings.Contains(stderr, "CREATE_DELETE_SNAPSHOT") {
			t.Errorf("stderr does not name the missing capability:\n%s", stderr)
		}
		if v, _ := d.left(); v != 0 {
			t.Errorf("%d volumes created before the capability check", v)
		}
	})
	t.Run("no clone", func(t *testing.T) {
		d := &fakeDriver{snapshots: true}
		ep := serveFake(t, d)
		out := filepath.Join(t.TempDir(), "r.json")
		code, _, _ := cowbench(t, t.Context(), "csi", "--endpoint", ep, "--write", "0", "--sizes", "1Gi", "--concurrency", "1", "--snapshots", "1", "--output", "json="+out)
		if code != exitOK {
			t.Fatalf("exit %d, want 0", code)
		}
		r := readResult(t, out)
		checkRows(t, r, []string{bench.OpCreateSnapshot, bench.OpRestore, bench.OpDeleteSnapshot, bench.OpDeleteVolume}, []string{"1Gi"}, []int{1})
		for _, row := range r.Rows {
			if row.Op == bench.OpClone {
				t.Errorf("a clone row without CLONE_VOLUME: %+v", row)
			}
		}
		if !strings.Contains(strings.Join(r.Notes, "\n"), "CLONE_VOLUME") {
			t.Errorf("notes %q do not say why clones were skipped", r.Notes)
		}
	})
}

// TestCSIUnreachable: exit code 2 and a message naming the endpoint, for a
// socket path with nothing there and for a socket nobody serves.
func TestCSIUnreachable(t *testing.T) {
	dir := t.TempDir()
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	for _, ep := range []string{"unix://" + filepath.Join(dir, "missing.sock"), "unix://" + stale} {
		code, _, stderr := cowbench(t, t.Context(), "csi", "--endpoint", ep, "--connect-timeout", "1s")
		if code != exitSetup {
			t.Errorf("%s: exit %d, want %d", ep, code, exitSetup)
		}
		if !strings.Contains(stderr, "cannot reach the CSI driver at "+ep) {
			t.Errorf("%s: stderr does not name the endpoint:\n%s", ep, stderr)
		}
	}
}

// TestCSIFailures: failed operations make the exit code non-zero and are
// listed with their message.
func TestCSIFailures(t *testing.T) {
	d := &fakeDriver{snapshots: true, failDeleteSnapshot: true}
	ep := serveFake(t, d)
	out := filepath.Join(t.TempDir(), "r.json")
	code, _, stderr := cowbench(t, t.Context(), "csi", "--endpoint", ep, "--write", "0", "--sizes", "1Gi",
		"--concurrency", "1", "--snapshots", "1", "--volumes", "2", "--output", "json="+out)
	if code != exitFailed {
		t.Errorf("exit %d, want %d", code, exitFailed)
	}
	r := readResult(t, out)
	found := false
	for _, f := range r.Errors {
		found = found || (f.Op == bench.OpDeleteSnapshot && f.Count == 2 && strings.Contains(f.Message, "refuses"))
	}
	if !found {
		t.Errorf("errors %+v lack the 2 DeleteSnapshot failures", r.Errors)
	}
	if !strings.Contains(stderr, "2 operations failed") {
		t.Errorf("stderr does not count the failures:\n%s", stderr)
	}
	// The cleanup could not delete the snapshots either, and says so.
	if !strings.Contains(stderr, "cleanup: DeleteSnapshot") {
		t.Errorf("stderr does not report what the cleanup left:\n%s", stderr)
	}
}

// TestCSIInterrupted: an interrupted run (Ctrl-C, --timeout) deletes what
// it created and exits non-zero.
func TestCSIInterrupted(t *testing.T) {
	ctx, cancel := context.WithCancelCause(t.Context())
	var once sync.Once
	d := &fakeDriver{snapshots: true, clone: true, onCreateSnapshot: func() {
		once.Do(func() { cancel(fmt.Errorf("interrupted (test)")) })
	}}
	ep := serveFake(t, d)
	out := filepath.Join(t.TempDir(), "r.json")
	code, _, _ := cowbench(t, ctx, "csi", "--endpoint", ep, "--write", "0", "--sizes", "1Gi,2Gi", "--concurrency", "2", "--output", "json="+out)
	if code != exitFailed {
		t.Errorf("exit %d, want %d", code, exitFailed)
	}
	if r := readResult(t, out); r.Interrupted != "interrupted (test)" {
		t.Errorf("interrupted = %q", r.Interrupted)
	}
	if v, s := d.left(); v+s != 0 {
		t.Errorf("%d volumes and %d snapshots left after an interrupted run", v, s)
	}
}

// TestCSICowcsi runs the csi mode as a user would with no setup: cowbench
// starts cowcsi on a temporary store, writes data through NodeStage and
// NodePublish (block with O_DIRECT, and ext4), and measures.
func TestCSICowcsi(t *testing.T) {
	testutil.RequireRoot(t)
	bin := buildCowcsi(t)
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"block", []string{"--access", "block", "--write", "16Mi"}},
		{"ext4", []string{"--access", "mount", "--fs-type", "ext4", "--write", "8Mi"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			work := t.TempDir()
			out := filepath.Join(t.TempDir(), "r.json")
			args := append([]string{"csi", "--start-driver", "--cowcsi", bin, "--work-dir", work,
				"--sizes", "64Mi,256Mi", "--snapshots", "2", "--concurrency", "1,2", "--output", "json=" + out}, tc.args...)
			code, _, _ := cowbench(t, t.Context(), args...)
			t.Cleanup(func() { checkReleased(t, work) })
			if code != exitOK {
				t.Fatalf("exit %d, want 0", code)
			}
			r := readResult(t, out)
			checkRows(t, r, append(controllerOps, bench.OpNodeStage, bench.OpNodePublish, bench.OpWrite, bench.OpNodeUnpublish, bench.OpNodeUnstage),
				[]string{"64Mi", "256Mi"}, []int{1, 2})
			if !strings.HasPrefix(r.Target, "cowcsi.io ") {
				t.Errorf("target %q", r.Target)
			}
		})
	}
}

// buildCowcsi builds the driver of this checkout.
func buildCowcsi(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "cowcsi")
	_, file, _, _ := runtime.Caller(0)
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/cowcsi")
	cmd.Dir = filepath.Join(filepath.Dir(file), "..", "..")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/cowcsi: %v\n%s", err, out)
	}
	return bin
}

// checkReleased asserts that nothing is mounted under dir and no loop
// device is backed by a file under it.
func checkReleased(t *testing.T, dir string) {
	t.Helper()
	mounts, err := testutil.MountsUnder(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) > 0 {
		t.Errorf("still mounted under %s:\n%s", dir, strings.Join(mounts, "\n"))
	}
	loops, err := loopdev.BindingsUnder(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range loops {
		t.Errorf("%s: loop device still backed by %s", l.Path, l.BackingFile)
	}
}
