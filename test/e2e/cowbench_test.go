package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Exit codes of cowbench (cmd/cowbench/main.go).
const (
	cowbenchFailed = 1 // operations failed, the run was interrupted, or cleanup failed
	cowbenchSetup  = 2 // bad flags, or the run could not start
)

// cowbenchOps are the operations a k8s run without writer pods times
// (cmd/cowbench/internal/bench), and how many of each one cell of
// --volumes v --snapshots s makes.
var cowbenchOps = []struct {
	op    string
	count func(v, s int) int
}{
	{"CreateVolume", func(v, _ int) int { return v }},
	{"CreateSnapshot", func(v, s int) int { return v * s }},
	{"restore", func(v, s int) int { return v * s }},
	{"clone", func(v, _ int) int { return v }},
	{"DeleteSnapshot", func(v, s int) int { return v * s }},
	{"DeleteVolume", func(v, s int) int { return v + v*s + v }}, // sources, restores, clones
}

// benchResult is the part of cowbench's JSON output the tests read.
type benchResult struct {
	Mode        string            `json:"mode"`
	Rows        []benchRow        `json:"rows"`
	Errors      []json.RawMessage `json:"errors"`
	Interrupted string            `json:"interrupted"`
}

type benchRow struct {
	Op          string  `json:"op"`
	Size        string  `json:"size"`
	Concurrency int     `json:"concurrency"`
	Count       int     `json:"count"`
	Errors      int     `json:"errors"`
	P50Ms       float64 `json:"p50_ms"`
	P99Ms       float64 `json:"p99_ms"`
	MaxMs       float64 `json:"max_ms"`
}

// cowbenchRunner runs the cowbench of this checkout against the shared
// cluster.
type cowbenchRunner struct {
	c          *cluster
	bin        string
	kubeconfig string
}

// TestCowbench runs `cowbench k8s` (docs/COWBENCH.md) against this control
// plane with deploy/'s classes: a whole run, the preflight errors, and runs
// interrupted with SIGINT, none of which may leave anything behind.
func TestCowbench(t *testing.T) {
	c := needCluster(t)
	dir := t.TempDir()
	b := &cowbenchRunner{c: c, bin: filepath.Join(dir, "cowbench"), kubeconfig: filepath.Join(dir, "admin.kubeconfig")}
	build := exec.CommandContext(t.Context(), "go", "build", "-o", b.bin, "./cmd/cowbench")
	build.Dir = c.bins.repoRoot
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/cowbench: %v\n%s", err, out)
	}
	if err := c.writeKubeconfig(b.kubeconfig, "admin", c.pki.AdminToken); err != nil {
		t.Fatal(err)
	}
	t.Run("Run", b.testRun)
	t.Run("Preflight", b.testPreflight)
	t.Run("Interrupt", b.testInterrupt)
}

// testRun: every operation at every size and concurrency level succeeds as
// often as planned, and the namespace, PVs, contents and the volumes and
// snapshots in the stores are gone when cowbench exits.
func (b *cowbenchRunner) testRun(t *testing.T) {
	const prefix = "cowbench-e2e-"
	b.sweepAfter(t, prefix)
	before := storeContents(t, b.c)
	out := filepath.Join(t.TempDir(), "r.json")
	code, stdout, _ := b.run(t, "k8s", "--kubeconfig", b.kubeconfig, "--storage-class", storageClass,
		"--snapshot-class", snapshotClass, "--node", nodeA, "--namespace-prefix", prefix,
		"--sizes", "64Mi,256Mi", "--snapshots", "2", "--concurrency", "1,2", "--volumes", "2", "--op-timeout", "2m",
		"--output", "table,json="+out)
	if code != 0 {
		t.Fatalf("exit %d, want 0", code)
	}
	t.Logf("\n%s", stdout)
	if !strings.Contains(stdout, "CreateSnapshot") {
		t.Errorf("no table on stdout")
	}
	r := readBenchResult(t, out)
	if r.Mode != "k8s" || r.Interrupted != "" || len(r.Errors) != 0 {
		t.Errorf("mode %q, interrupted %q, errors %s", r.Mode, r.Interrupted, r.Errors)
	}
	checkBenchRows(t, r, []string{"64Mi", "256Mi"}, []int{1, 2}, 2, 2)
	b.checkNothingLeft(t, prefix, before)
}

// testPreflight: a missing snapshot class or node, or no node for the
// WaitForFirstConsumer class, stop the run with exit 2 before anything is
// created.
func (b *cowbenchRunner) testPreflight(t *testing.T) {
	const prefix = "cowbench-e2e-preflight-"
	b.sweepAfter(t, prefix)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--snapshot-class", "no-such-class", "--node", nodeA}, `volume snapshot class "no-such-class" not found`},
		{[]string{"--snapshot-class", snapshotClass}, "--node NAME"},
		{[]string{"--snapshot-class", snapshotClass, "--node", "no-such-node"}, `"no-such-node": no such node`},
	} {
		args := append([]string{"k8s", "--kubeconfig", b.kubeconfig, "--storage-class", storageClass, "--namespace-prefix", prefix}, tc.args...)
		code, _, stderr := b.run(t, args...)
		if code != cowbenchSetup || !strings.Contains(stderr, tc.want) {
			t.Errorf("%q: exit %d, stderr %q; want exit %d and %q", tc.args, code, stderr, cowbenchSetup, tc.want)
		}
	}
	left, err := b.leftovers(t.Context(), prefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		t.Errorf("created before the checks: %v", left)
	}
}

// testInterrupt: one SIGINT while claims are being provisioned, or while
// snapshots are being taken, stops the run; cowbench cleans up and exits 1
// (interrupted), reporting what it measured before, and nothing it made is
// left when it exits.
func (b *cowbenchRunner) testInterrupt(t *testing.T) {
	for _, tc := range []struct {
		name, kind string
		first      func(ctx context.Context, prefix string) (string, error)
		// The operations whose phases are done at the signal, all of
		// 64Mi at concurrency 4.
		done []string
	}{
		{"Provisioning", "PersistentVolumeClaim", b.firstClaim, nil},
		{"Snapshotting", "VolumeSnapshot", b.firstSnapshot, []string{"CreateVolume"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			prefix := "cowbench-e2e-int-" + strings.ToLower(tc.name[:4]) + "-"
			b.sweepAfter(t, prefix)
			before := storeContents(t, b.c)
			out := filepath.Join(t.TempDir(), "r.json")
			cmd := exec.Command(b.bin, "k8s", "--kubeconfig", b.kubeconfig, "--storage-class", storageClass,
				"--snapshot-class", snapshotClass, "--node", nodeA, "--namespace-prefix", prefix,
				"--sizes", "64Mi,256Mi", "--snapshots", "4", "--concurrency", "4", "--volumes", "8", "--op-timeout", "2m",
				"--output", "json="+out)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			var waitErr error
			exited := make(chan struct{})
			go func() {
				waitErr = cmd.Wait()
				close(exited)
			}()
			t.Cleanup(func() {
				select {
				case <-exited:
				default: // the test failed before cowbench exited
					_ = cmd.Process.Kill()
					<-exited
				}
			})

			ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
			defer cancel()
			var first string
			err := waitFor(ctx, 20*time.Millisecond, "a "+tc.kind+" in a cowbench namespace", func() (bool, error) {
				select {
				case <-exited:
					return false, permanentError{fmt.Errorf("cowbench exited (%v) first; stderr:\n%s", waitErr, stderr.String())}
				default:
				}
				var err error
				first, err = tc.first(ctx, prefix)
				return first != "", err
			})
			if err != nil {
				t.Fatal(err)
			}
			sent := time.Now()
			if err := cmd.Process.Signal(os.Interrupt); err != nil {
				t.Fatal(err)
			}
			left, err := b.leftovers(t.Context(), prefix)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("SIGINT sent at %s %s, with %d objects made: %v", tc.kind, first, len(left), left)
			// The cleanup deletes a few dozen claims and snapshots; it
			// takes about ten seconds here.
			const bound = time.Minute
			select {
			case <-exited:
			case <-time.After(bound):
				_ = cmd.Process.Kill()
				<-exited
				t.Fatalf("cowbench still running %v after SIGINT; stderr:\n%s", bound, stderr.String())
			}
			t.Logf("cowbench exited %v after SIGINT (%v); stderr:\n%s", time.Since(sent).Round(time.Millisecond), waitErr, stderr.String())
			var ee *exec.ExitError
			if !errors.As(waitErr, &ee) || ee.ExitCode() != cowbenchFailed {
				t.Errorf("exit: %v, want exit status %d", waitErr, cowbenchFailed)
			}
			b.checkNothingLeft(t, prefix, before)

			// Operations the signal cut short are neither samples nor
			// failures; the phases done before it are reported whole,
			// and nothing after it ran.
			r := readBenchResult(t, out)
			if r.Interrupted == "" {
				t.Errorf("the JSON output does not say the run was interrupted")
			}
			if len(r.Errors) != 0 {
				t.Errorf("errors %s, want none", r.Errors)
			}
			for _, row := range r.Rows {
				if row.Errors != 0 || row.Size != "64Mi" || row.Concurrency != 4 {
					t.Errorf("row %+v: want only 64Mi c=4 and no errors", row)
				}
			}
			for _, op := range tc.done {
				if !slices.ContainsFunc(r.Rows, func(row benchRow) bool { return row.Op == op && row.Count == 8 }) {
					t.Errorf("no row of %s with count 8: %+v", op, r.Rows)
				}
			}
		})
	}
}

// firstClaim returns a PVC in a namespace with prefix, if there is one.
func (b *cowbenchRunner) firstClaim(ctx context.Context, prefix string) (string, error) {
	pvcs, err := b.c.kube.CoreV1().PersistentVolumeClaims("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return "", err
	}
	for _, p := range pvcs.Items {
		if strings.HasPrefix(p.Namespace, prefix) {
			return p.Namespace + "/" + p.Name, nil
		}
	}
	return "", nil
}

// firstSnapshot returns a VolumeSnapshot in a namespace with prefix, if
// there is one.
func (b *cowbenchRunner) firstSnapshot(ctx context.Context, prefix string) (string, error) {
	vss, err := b.c.snap.SnapshotV1().VolumeSnapshots("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return "", err
	}
	for _, vs := range vss.Items {
		if strings.HasPrefix(vs.Namespace, prefix) {
			return vs.Namespace + "/" + vs.Name, nil
		}
	}
	return "", nil
}

// run runs cowbench to its end and returns its exit code, stdout and
// stderr.
func (b *cowbenchRunner) run(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, b.bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("cowbench %s: %v", strings.Join(args, " "), err)
	}
	code := cmd.ProcessState.ExitCode()
	t.Logf("cowbench %s: exit %d in %v\nstderr:\n%s", strings.Join(args, " "), code, time.Since(start).Round(time.Millisecond), stderr.String())
	return code, stdout.String(), stderr.String()
}

func readBenchResult(t *testing.T, path string) *benchResult {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var r benchResult
	if err := json.Unmarshal(data, &r); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return &r
}

// checkBenchRows asserts that every operation has a row at every size and
// concurrency level, with the planned count of successes, no errors and
// ordered percentiles.
func checkBenchRows(t *testing.T, r *benchResult, sizes []string, concs []int, volumes, snapshots int) {
	t.Helper()
	type key struct {
		op, size string
		c        int
	}
	rows := map[key]benchRow{}
	for _, row := range r.Rows {
		rows[key{row.Op, row.Size, row.Concurrency}] = row
	}
	for _, o := range cowbenchOps {
		want := o.count(volumes, snapshots)
		for _, s := range sizes {
			for _, c := range concs {
				row, ok := rows[key{o.op, s, c}]
				switch {
				case !ok:
					t.Errorf("no row for %s %s c=%d", o.op, s, c)
				case row.Count != want || row.Errors != 0:
					t.Errorf("%s %s c=%d: count %d errors %d, want count %d and no errors", o.op, s, c, row.Count, row.Errors, want)
				case row.P50Ms <= 0 || row.P50Ms > row.P99Ms || row.P99Ms > row.MaxMs:
					t.Errorf("%s %s c=%d: p50 %v p99 %v max %v out of order", o.op, s, c, row.P50Ms, row.P99Ms, row.MaxMs)
				}
			}
		}
	}
}

// leftovers lists the namespaces with prefix, and the PVs and
// VolumeSnapshotContents that refer to such namespaces.
func (b *cowbenchRunner) leftovers(ctx context.Context, prefix string) ([]string, error) {
	var left []string
	nss, err := b.c.kube.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	for _, ns := range nss.Items {
		if strings.HasPrefix(ns.Name, prefix) {
			left = append(left, "namespace "+ns.Name)
		}
	}
	pvs, err := b.c.kube.CoreV1().PersistentVolumes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	for _, pv := range pvs.Items {
		if pv.Spec.ClaimRef != nil && strings.HasPrefix(pv.Spec.ClaimRef.Namespace, prefix) {
			left = append(left, "PV "+pv.Name+" of "+pv.Spec.ClaimRef.Namespace+"/"+pv.Spec.ClaimRef.Name)
		}
	}
	vscs, err := b.c.snap.SnapshotV1().VolumeSnapshotContents().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	for _, vsc := range vscs.Items {
		if ref := vsc.Spec.VolumeSnapshotRef; strings.HasPrefix(ref.Namespace, prefix) {
			left = append(left, "VolumeSnapshotContent "+vsc.Name+" of "+ref.Namespace+"/"+ref.Name)
		}
	}
	return left, nil
}

// checkNothingLeft asserts, right after cowbench exited, what it promises:
// its namespace, the PVs and contents of its objects, and so the volumes and
// snapshots in the stores, are deleted before it exits.
func (b *cowbenchRunner) checkNothingLeft(t *testing.T, prefix string, storesBefore []string) {
	t.Helper()
	left, err := b.leftovers(t.Context(), prefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		t.Errorf("left when cowbench exited: %v", left)
	}
	if after := storeContents(t, b.c); !slices.Equal(storesBefore, after) {
		t.Errorf("stores changed: %v -> %v", storesBefore, after)
	}
}

// sweepAfter deletes, after the test, what cowbench left with prefix, so
// that a failure here does not leak into the next test's stores.
func (b *cowbenchRunner) sweepAfter(t *testing.T, prefix string) {
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		err := waitFor(ctx, 500*time.Millisecond, "what cowbench left to be deleted", func() (bool, error) {
			left, err := b.leftovers(ctx, prefix)
			if err != nil || len(left) == 0 {
				return err == nil, err
			}
			nss, err := b.c.kube.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
			if err != nil {
				return false, err
			}
			for _, ns := range nss.Items {
				if strings.HasPrefix(ns.Name, prefix) && ns.DeletionTimestamp == nil {
					if err := b.c.kube.CoreV1().Namespaces().Delete(ctx, ns.Name, metav1.DeleteOptions{}); err != nil {
						return false, err
					}
				}
			}
			return false, fmt.Errorf("left: %v", left)
		})
		if err != nil {
			t.Errorf("%v%s", err, b.c.logHint())
		}
	})
}
