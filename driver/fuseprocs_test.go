package driver

import (
	"context"
	"os"
	"runtime"
	"testing"

	"github.com/cowcsi/cowcsi/cow/fusefs"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// procsAtStart is GOMAXPROCS before any test ran (package variables are
// set before tests start, and no ring serves before then).
var procsAtStart = runtime.GOMAXPROCS(0)

// TestMountFuseExportReservesProcs: once a ring serves, the process has a
// P per ring queue on top of what it started with (once per process,
// however many rings), unless the GOMAXPROCS environment variable set it.
func TestMountFuseExportReservesProcs(t *testing.T) {
	testutil.RequireRoot(t, nodeNeeds...)
	if !fusefs.IOURingSupported() {
		t.Skip("kernel without FUSE over io_uring")
	}
	var queues int
	for range 2 {
		e, err := MountFuseExport(context.Background(), t.TempDir(), FuseIOURingOn)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := e.Unmount(); err != nil {
				t.Error(err)
			}
		})
		queues = e.(fuseExport).s.RingQueues()
	}
	if queues == 0 {
		t.Fatal("no ring queue serves with --fuse-io-uring=on")
	}
	want := procsAtStart + queues
	if os.Getenv("GOMAXPROCS") != "" {
		want = procsAtStart
	}
	if got := runtime.GOMAXPROCS(0); got != want {
		t.Fatalf("GOMAXPROCS %d after two ring mounts with %d queues each, started at %d: want %d", got, queues, procsAtStart, want)
	}
}
