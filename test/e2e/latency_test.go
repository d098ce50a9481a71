package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// series is one volume that is snapshotted and restored n times.
type series struct {
	label   string
	size    string
	prefill int64 // bytes written and synced before the first snapshot
}

type seriesResult struct {
	series
	ready, bound         []time.Duration
	snapSteps, restSteps [][]milestone
}

// TestLatency measures, through the whole upstream stack, the time from
// creating a VolumeSnapshot to readyToUse and from creating a PVC from it to
// Bound, for an empty volume (the floor: no data to freeze or flush) and for
// volumes of different sizes with data written. Before each snapshot a small
// file is written without sync, so each snapshot freezes a dirty filesystem.
//
// COWCSI_E2E_BENCH_N sets the number of snapshots per volume (default 10);
// COWCSI_E2E_BENCH_OUT names a file to write the results to as Markdown
// (make e2e-bench; docs/BENCHMARKS.md, "Kubernetes level", records a run).
func TestLatency(t *testing.T) {
	c := needCluster(t)
	n := 10
	if v := os.Getenv("COWCSI_E2E_BENCH_N"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 1 {
			t.Fatalf("COWCSI_E2E_BENCH_N=%q", v)
		}
	}
	all := []series{
		{label: "empty 1Gi volume (floor)", size: "1Gi"},
		{label: "1Gi volume, 64 MiB written", size: "1Gi", prefill: 64 << 20},
		{label: "16Gi volume, 512 MiB written", size: "16Gi", prefill: 512 << 20},
	}
	var results []seriesResult
	for i, s := range all {
		t.Run(fmt.Sprintf("series%d", i), func(t *testing.T) {
			results = append(results, measure(t, c, s, n))
		})
	}
	report := latencyReport(results, n)
	t.Logf("\n%s", report)
	if out := os.Getenv("COWCSI_E2E_BENCH_OUT"); out != "" {
		if err := os.WriteFile(out, []byte(report), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range results {
		if p50 := percentile(r.ready, 50); p50 > time.Second {
			t.Logf("note: %s: readyToUse p50 %v is over the 1 s target", r.label, p50)
		}
	}
}

func measure(t *testing.T, c *cluster, s series, n int) seriesResult {
	ctx := t.Context()
	ns := newNS(t, c)
	a := c.node(t, nodeA)
	res := seriesResult{series: s}
	_, pv := provision(t, ns, claim{name: "src", size: s.size, node: nodeA})
	m := publishFor(t, a, pv)
	if s.prefill > 0 {
		if err := fill(filepath.Join(m.target, "fill"), s.prefill); err != nil {
			t.Fatal(err)
		}
	}
	tr, err := startTracer(ctx, ns)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.close()
	for i := range n {
		if err := os.WriteFile(filepath.Join(m.target, importantFile), []byte(fmt.Sprintf("%s%d\n", importantData, i)), 0o644); err != nil {
			t.Fatal(err)
		}
		snap, rest := fmt.Sprintf("snap-%d", i), fmt.Sprintf("restore-%d", i)

		t0 := time.Now()
		vs, err := ns.createSnapshot(ctx, snap, "src", snapshotClass)
		if err != nil {
			t.Fatal(err)
		}
		_, vsc, err := ns.waitReady(ctx, snap)
		if err != nil {
			t.Fatal(err)
		}
		res.ready = append(res.ready, time.Since(t0))

		t1 := time.Now()
		rpvc, err := ns.createPVC(ctx, claim{name: rest, size: s.size, node: nodeA, source: snapshotSource(snap)})
		if err != nil {
			t.Fatal(err)
		}
		_, rpv, err := ns.waitBound(ctx, rest)
		if err != nil {
			t.Fatal(err)
		}
		res.bound = append(res.bound, time.Since(t1))
		// The watches may trail the waits by a moment.
		time.Sleep(50 * time.Millisecond)
		driverLog := a.logPath("cowcsi")
		res.snapSteps = append(res.snapSteps, tr.snapshotMilestones(ns.name, snap, string(vs.UID), driverLog, t0))
		res.restSteps = append(res.restSteps, tr.restoreMilestones(ns.name, rest, string(rpvc.UID), driverLog, t1))

		// Each round starts from the same state: the restore and the
		// snapshot are deleted, and gone from the store.
		if err := c.kube.CoreV1().PersistentVolumeClaims(ns.name).Delete(ctx, rest, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := c.snap.SnapshotV1().VolumeSnapshots(ns.name).Delete(ctx, snap, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		wctx, cancel := context.WithTimeout(ctx, defaultTimeout)
		err = waitFor(wctx, 50*time.Millisecond, "restore PV and snapshot content to go", func() (bool, error) {
			_, err1 := c.kube.CoreV1().PersistentVolumes().Get(wctx, rpv.Name, metav1.GetOptions{})
			_, err2 := c.snap.SnapshotV1().VolumeSnapshotContents().Get(wctx, vsc.Name, metav1.GetOptions{})
			return apierrors.IsNotFound(err1) && apierrors.IsNotFound(err2), nil
		})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("%s: readyToUse p50 %v p90 %v; Bound p50 %v p90 %v", s.label,
		percentile(res.ready, 50), percentile(res.ready, 90), percentile(res.bound, 50), percentile(res.bound, 90))
	return res
}

// fill writes size bytes of non-zero data to path and syncs it.
func fill(path string, size int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i*7 + 1)
	}
	for w := int64(0); w < size; w += int64(len(buf)) {
		if _, err := f.Write(buf); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func latencyReport(results []seriesResult, n int) string {
	var b strings.Builder
	host, _ := os.Hostname()
	fmt.Fprintf(&b, "Measured by `make e2e-bench` (test/e2e TestLatency) on %s, %d CPUs, %s, %s: %d snapshots and %d restores per volume, one at a time, on node %s.\n\n",
		host, runtime.NumCPU(), runtime.GOOS+"/"+runtime.GOARCH, time.Now().UTC().Format("2006-01-02"), n, n, nodeA)
	b.WriteString("| volume | VolumeSnapshot → readyToUse p50 | p90 | restore PVC → Bound p50 | p90 |\n|---|---:|---:|---:|---:|\n")
	for _, r := range results {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", r.label,
			ms(percentile(r.ready, 50)), ms(percentile(r.ready, 90)), ms(percentile(r.bound, 50)), ms(percentile(r.bound, 90)))
	}
	for _, r := range results {
		fmt.Fprintf(&b, "\n%s, snapshot (offsets from the Create call, as seen by a watch):\n\n%s", r.label, stepTable(r.snapSteps))
		fmt.Fprintf(&b, "\n%s, restore:\n\n%s", r.label, stepTable(r.restSteps))
	}
	return b.String()
}
