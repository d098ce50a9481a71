package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cowcsi/cowcsi/test/testutil"
)

// writeReport writes a bench-io report with the given rows' per-round
// ratios (row ID → ratios) and returns its path.
func writeReport(t *testing.T, name string, rows map[string][]float64) string {
	t.Helper()
	var rep savedReport
	ids := make([]string, 0, len(rows))
	for id := range rows {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		rep.Rows = append(rep.Rows, savedRow{ID: id, Name: id, Unit: "IOPS", Ratios: rows[id], CPU: []float64{1.5}})
	}
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestCompareReports checks the verdicts: rounds are pooled over each
// side's reports, and only a row whose new rounds all lie below all its
// old rounds is reported lower.
func TestCompareReports(t *testing.T) {
	old1 := writeReport(t, "old1.json", map[string][]float64{"down": {0.80, 0.85}, "up": {0.50, 0.55}, "same": {0.60, 0.70}, "gone": {1}})
	old2 := writeReport(t, "old2.json", map[string][]float64{"down": {0.90}, "up": {0.52}, "same": {0.65}})
	new1 := writeReport(t, "new1.json", map[string][]float64{"down": {0.70, 0.79}, "up": {0.60}, "same": {0.62, 0.75}, "added": {1}})
	new2 := writeReport(t, "new2.json", map[string][]float64{"down": {0.75}, "up": {0.58}, "same": {0.55}})
	var out bytes.Buffer
	lower, err := compareReports(&out, []string{old1, old2}, []string{new1, new2})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(lower, []string{"down"}) {
		t.Errorf("lower rows %v; want [down]", lower)
	}
	want := map[string][]string{
		"down":  {"0.85 [0.80-0.90] n=3", "0.75 [0.70-0.79] n=3", "LOWER"},
		"up":    {"0.52 [0.50-0.55] n=3", "0.59 [0.58-0.60] n=2", "higher"},
		"same":  {"0.65 [0.60-0.70] n=3", "ranges overlap"},
		"gone":  {"(not run)"},
		"added": {"(not run)"},
	}
	lines := strings.Split(out.String(), "\n")
	for id, parts := range want {
		i := slices.IndexFunc(lines, func(l string) bool { return strings.HasPrefix(l, id+" ") })
		if i < 0 {
			t.Errorf("no line for row %s in:\n%s", id, out.String())
			continue
		}
		for _, p := range parts {
			if !strings.Contains(lines[i], p) {
				t.Errorf("row %s: %q lacks %q", id, lines[i], p)
			}
		}
	}
	if _, err := compareReports(&out, []string{filepath.Join(t.TempDir(), "missing.json")}, []string{new1}); err == nil {
		t.Error("a missing report compared without error")
	}
	empty := filepath.Join(t.TempDir(), "empty.json")
	if err := os.WriteFile(empty, []byte(`{"rows":[]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := compareReports(&out, []string{empty}, []string{new1}); err == nil {
		t.Error("a report without rows compared without error")
	}
}

// TestAB runs make bench-io-ab's script for real, against HEAD, with one
// tiny row: it builds both binaries (HEAD's from a git worktree), runs them
// alternately and prints the comparison. Its figures mean nothing; what it
// checks is that the A/B keeps working and cleans up its worktree. It runs
// with COWCSI_BENCH_IO set (make bench-io-check): building two binaries
// and four benchmark runs is no correctness test.
func TestAB(t *testing.T) {
	testutil.RequireRoot(t)
	if testing.Short() {
		t.Skip("-short")
	}
	if !fullBench() {
		t.Skip("a benchmark run: set COWCSI_BENCH_IO=1 (make bench-io-check)")
	}
	if err := exec.Command("git", "rev-parse", "--verify", "HEAD").Run(); err != nil {
		t.Skipf("not in a git checkout with a commit: %v", err)
	}
	dir := t.TempDir()
	cmd := exec.Command("bash", "ab.sh", "HEAD", "-only", "raw-4k-randread", "-rounds", "1", "-runtime", "1s",
		"-size", "128M", "-dir", filepath.Join(dir, "work"))
	cmd.Env = append(os.Environ(), "BENCH_IO_AB_DIR="+filepath.Join(dir, "ab"), "TMPDIR="+dir)
	out, err := cmd.CombinedOutput()
	// Exit status 1 is a verdict (noise can put both new rounds below both
	// old ones), not a failure of the tool.
	if ee, ok := err.(*exec.ExitError); err != nil && !(ok && ee.ExitCode() == 1) {
		t.Fatalf("ab.sh: %v\n%s", err, out)
	}
	for _, want := range []string{"pass 2/2, old", "pass 2/2, new", "4k randread (IOPS)", "n=2"} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	for _, f := range []string{"old-1.json", "old-2.json", "new-1.json", "new-2.json"} {
		if _, err := os.Stat(filepath.Join(dir, "ab", f)); err != nil {
			t.Error(err)
		}
	}
	wts, err := exec.Command("git", "worktree", "list", "--porcelain").Output()
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(wts, []byte(dir)) {
		t.Errorf("worktree left behind:\n%s", wts)
	}
}
