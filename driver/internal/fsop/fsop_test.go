package fsop

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestErrorsCrossTheProcessBoundary: what callers test with errors.Is
// survives the trip from the child.
func TestErrorsCrossTheProcessBoundary(t *testing.T) {
	ctx := context.Background()
	err := Probe(ctx, filepath.Join(t.TempDir(), "missing"))
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Probe of a missing file: %v; want ErrNotExist", err)
	}
	f := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(f, make([]byte, 12345), 0o644); err != nil {
		t.Fatal(err)
	}
	if n, err := StatSize(ctx, f); err != nil || n != 12345 {
		t.Errorf("StatSize = %d, %v; want 12345", n, err)
	}
	if Probe(ctx, f) != nil {
		t.Errorf("Probe of a readable file failed")
	}
}

// TestFreezeRefusesAnotherFilesystem: a path that is not on the given
// block device is never frozen (a missing staging mount leaves the
// node's own filesystem there).
func TestFreezeRefusesAnotherFilesystem(t *testing.T) {
	dev := ""
	for _, d := range []string{"/dev/loop0", "/dev/sda", "/dev/vda"} {
		if st, err := os.Stat(d); err == nil && st.Mode()&fs.ModeDevice != 0 && st.Mode()&fs.ModeCharDevice == 0 {
			dev = d
			break
		}
	}
	if dev == "" {
		t.Skip("no block device to compare with")
	}
	f, err := StartFreeze(context.Background(), t.TempDir(), dev, 5*time.Second)
	if !errors.Is(err, ErrNotMounted) {
		t.Fatalf("StartFreeze of a directory not on %s: %v; want ErrNotMounted", dev, err)
	}
	<-f.Exited()
	if !f.Clean() {
		t.Errorf("the child did not exit cleanly")
	}
}

// TestRunBoundedByContext: a child that has not answered when the context
// ends is given up on at once.
func TestRunBoundedByContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := run(ctx, request{Op: opStatSize, Path: "/"}); !errors.Is(err, context.Canceled) {
		t.Errorf("run with a cancelled context: %v; want Canceled", err)
	}
}

// TestChildThatDoesNotStart: a failure to start is an error, not a hang.
func TestChildThatDoesNotStart(t *testing.T) {
	old := exe
	exe = filepath.Join(t.TempDir(), "missing")
	t.Cleanup(func() { exe = old })
	if err := Probe(context.Background(), "/"); err == nil {
		t.Error("Probe with no binary to run succeeded")
	}
}
