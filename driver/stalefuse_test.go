package driver

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/fusefs"
	"github.com/cowcsi/cowcsi/cow/loopdev"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// TestMain lets a test run this binary as a helper process that serves a
// FUSE file with a loop device on it, so that the test can kill it.
func TestMain(m *testing.M) {
	if dir := os.Getenv("COWCSI_REPRO_FUSE_DIR"); dir != "" {
		os.Exit(reproFuseHelper(dir))
	}
	if spec := os.Getenv(envHelperDriver); spec != "" {
		os.Exit(helperDriverMain(spec))
	}
	os.Exit(m.Run())
}

// memFile is a BlockFile in memory.
type memFile struct {
	mu   sync.Mutex
	data []byte
}

func (f *memFile) ReadAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if off >= int64(len(f.data)) {
		return 0, io.EOF
	}
	n := copy(p, f.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (f *memFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if off+int64(len(p)) > int64(len(f.data)) {
		return 0, errors.New("write past end")
	}
	return copy(f.data[off:], p), nil
}

func (f *memFile) Flush() error                    { return nil }
func (f *memFile) Discard(off, length int64) error { return nil }
func (f *memFile) Size() int64                     { return int64(len(f.data)) }

func reproFuseHelper(dir string) int {
	ctx := context.Background()
	s, err := fusefs.Mount(ctx, dir, fusefs.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := s.Add("vol", &memFile{data: make([]byte, 16<<20)}, false); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	d, err := loopdev.Attach(ctx, s.Path("vol"), loopdev.Options{LogicalBlockSize: 4096})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println(d.Path)
	select {} // serve until killed
}

// TestLoopdevWithDeadFUSEServer: cow/loopdev must see and detach a loop
// device whose backing file lives on a FUSE mount whose server died (the
// driver crashed) — exactly the device a restarted driver must clean up.
// LOOP_GET_STATUS64 stats the backing file, which fails once the dead
// mount's cached attributes expire, so loopdev falls back to sysfs. Found by
// the crash-recovery test leaking loop devices under load.
func TestLoopdevWithDeadFUSEServer(t *testing.T) {
	testutil.RequireRoot(t, nodeNeeds...)
	dir := filepath.Join(t.TempDir(), "fuse")
	file := filepath.Join(dir, "vol")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "COWCSI_REPRO_FUSE_DIR="+dir)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	dev := strings.TrimSpace(line)
	t.Cleanup(func() {
		if dev != "" {
			clearStale(dev, file)
		}
		unix.Unmount(dir, unix.MNT_DETACH)
	})
	if err != nil || !strings.HasPrefix(dev, "/dev/loop") {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper: %q %v", line, err)
	}
	// The "driver" crashes: its FUSE connection is aborted.
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	// Wait until the kernel's cached attributes of the file expire.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var st unix.Stat_t
		if err := unix.Stat(file, &st); errors.Is(err, unix.ENOTCONN) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the dead FUSE mount still answers stat")
		}
		time.Sleep(50 * time.Millisecond) // polling a kernel cache timeout
	}
	// sysfs still names it (as "<path> (deleted)": the dentry went
	// stale with the connection).
	if cur, err := loopdev.BackingFileOf(dev); err != nil || cur != file {
		t.Fatalf("sysfs: %s is bound to %q (%v), want %s", dev, cur, err, file)
	}
	if got, _ := findBySysfs(file); len(got) != 1 || got[0] != dev {
		t.Errorf("driver workaround findBySysfs = %v, want [%s]", got, dev)
	}

	devs, err := loopdev.FindByBacking(file)
	if err != nil {
		t.Errorf("loopdev.FindByBacking(%s) with the FUSE server dead: %v; want [%s]", file, err, dev)
	} else if len(devs) != 1 || devs[0].Path != dev {
		t.Errorf("loopdev.FindByBacking = %v, want [%s]", devs, dev)
	}
	d, err := loopdev.Open(dev)
	if err != nil {
		t.Errorf("loopdev.Open(%s) with the FUSE server dead: %v", dev, err)
		return
	}
	if err := d.Detach(); err != nil {
		t.Errorf("Detach: %v", err)
	}
	if _, err := loopdev.BackingFileOf(dev); err == nil {
		t.Errorf("%s still bound after Detach", dev)
	}
}
