package bench

import (
	"errors"
	"strings"
	"testing"
)

func TestPlan(t *testing.T) {
	ok := Plan{Sizes: []int64{1 << 30}, Concurrency: []int{1, 4}, Snapshots: 1, Access: AccessBlock}
	if errs := ok.Validate(); len(errs) != 0 {
		t.Fatalf("valid plan: %v", errs)
	}
	if got := ok.VolumesFor(1); got != 4 {
		t.Errorf("VolumesFor(1) = %d, want at least 4", got)
	}
	if got := ok.VolumesFor(8); got != 16 {
		t.Errorf("VolumesFor(8) = %d, want 2×8", got)
	}
	fixed := ok
	fixed.Volumes = 3
	if got := fixed.VolumesFor(8); got != 3 {
		t.Errorf("VolumesFor with --volumes 3 = %d", got)
	}
	bad := Plan{Sizes: []int64{0}, Concurrency: []int{0}, Volumes: -1, Access: "file"}
	msg := errors.Join(bad.Validate()...).Error()
	for _, want := range []string{"--sizes: 0 is not a positive size", "--concurrency: 0 is below 1", "--volumes must not be negative", "--snapshots must be at least 1", `--access "file": want block or mount`} {
		if !strings.Contains(msg, want) {
			t.Errorf("errors %q lack %q", msg, want)
		}
	}
}
