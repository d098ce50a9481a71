package fusefs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/test/testutil"
)

// mount mounts a Server in a test directory and unmounts it on every path
// out of the test. With opts.IOURing the ring must be in use.
func mount(t *testing.T, opts Options) *Server {
	t.Helper()
	testutil.RequireRoot(t, testutil.DevFUSE)
	s, err := Mount(context.Background(), filepath.Join(t.TempDir(), "mnt"), opts)
	if err != nil {
		t.Fatal(err)
	}
	if on, err := s.IOURing(); opts.IOURing && !on {
		_ = s.Unmount()
		t.Fatalf("ring not in use: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Unmount(); err != nil {
			t.Errorf("cleanup Unmount: %v", err)
		}
	})
	return s
}

func add(t *testing.T, s *Server, name string, f BlockFile, readOnly bool) {
	t.Helper()
	if err := s.Add(name, f, readOnly); err != nil {
		t.Fatal(err)
	}
}

func openFile(t *testing.T, path string, flags int) int {
	t.Helper()
	fd, err := unix.Open(path, flags|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i)*31 + seed
	}
	return b
}

func TestReadWriteFsync(t *testing.T) { eachTransport(t, testReadWriteFsync) }

func testReadWriteFsync(t *testing.T, o Options) {
	s := mount(t, o)
	m := newMemFile(1 << 20)
	add(t, s, "vol", m, false)

	fi, err := os.Stat(s.Path("vol"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != 1<<20 || fi.Mode() != 0o600 {
		t.Fatalf("stat: size %d mode %v, want %d -rw-------", fi.Size(), fi.Mode(), 1<<20)
	}

	fd := openFile(t, s.Path("vol"), unix.O_RDWR)
	w := pattern(10000, 7)
	const off = 12345
	if n, err := unix.Pwrite(fd, w, off); err != nil || n != len(w) {
		t.Fatalf("pwrite: %d, %v", n, err)
	}
	if !bytes.Equal(m.bytes(off, len(w)), w) {
		t.Fatal("write did not reach the BlockFile")
	}
	r := make([]byte, len(w))
	if n, err := unix.Pread(fd, r, off); err != nil || n != len(r) || !bytes.Equal(r, w) {
		t.Fatalf("pread: %d, %v, equal=%v", n, err, bytes.Equal(r, w))
	}
	// Reads at the end are short, not errors.
	if n, err := unix.Pread(fd, r, 1<<20-100); err != nil || n != 100 {
		t.Fatalf("pread at end: %d, %v; want 100", n, err)
	}

	if flushes, _ := m.counts(); flushes != 0 {
		t.Fatalf("%d Flush calls before fsync, want 0", flushes)
	}
	if err := unix.Fsync(fd); err != nil {
		t.Fatal(err)
	}
	if flushes, _ := m.counts(); flushes != 1 {
		t.Fatalf("%d Flush calls after one fsync, want 1", flushes)
	}
	if err := unix.Fdatasync(fd); err != nil {
		t.Fatal(err)
	}
	if flushes, _ := m.counts(); flushes != 2 {
		t.Fatalf("%d Flush calls after fdatasync, want 2", flushes)
	}

	// close(2) is not a durability point.
	fd2 := openFile(t, s.Path("vol"), unix.O_RDONLY)
	if err := unix.Close(fd2); err != nil {
		t.Fatal(err)
	}
	if flushes, _ := m.counts(); flushes != 2 {
		t.Fatalf("%d Flush calls after close, want 2", flushes)
	}

	// Writes never extend the file.
	if _, err := unix.Pwrite(fd, w, 1<<20-10); !errors.Is(err, unix.EFBIG) {
		t.Fatalf("pwrite past the end: %v, want EFBIG", err)
	}
}

func TestDiscard(t *testing.T) { eachTransport(t, testDiscard) }

func testDiscard(t *testing.T, o Options) {
	s := mount(t, o)
	m := newMemFile(1 << 20)
	copy(m.data, pattern(len(m.data), 1))
	add(t, s, "vol", m, false)
	fd := openFile(t, s.Path("vol"), unix.O_RDWR)

	zeros := make([]byte, 8192)
	for _, tc := range []struct {
		name string
		mode uint32
		off  int64
	}{
		{"punch hole", unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, 4096},
		{"zero range", unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE, 65536},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, before := m.counts()
			if err := unix.Fallocate(fd, tc.mode, tc.off, int64(len(zeros))); err != nil {
				t.Fatal(err)
			}
			if _, after := m.counts(); after != before+1 {
				t.Fatalf("Discard calls %d -> %d, want one more", before, after)
			}
			r := make([]byte, len(zeros)+2)
			if _, err := unix.Pread(fd, r, tc.off-1); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(r[1:len(r)-1], zeros) || r[0] == 0 || r[len(r)-1] == 0 {
				t.Fatalf("discarded range does not read back as zeros bounded by data")
			}
		})
	}
	// Modes that would change the size are refused.
	if err := unix.Fallocate(fd, unix.FALLOC_FL_COLLAPSE_RANGE, 0, 4096); !errors.Is(err, unix.EOPNOTSUPP) {
		t.Fatalf("collapse range: %v, want EOPNOTSUPP", err)
	}
	// ... and a refusal does not disable discard for the connection.
	if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096); err != nil {
		t.Fatalf("punch hole after a refused mode: %v", err)
	}
}

func TestResized(t *testing.T) { eachTransport(t, testResized) }

func testResized(t *testing.T, o Options) {
	s := mount(t, o)
	m := newMemFile(1 << 20)
	add(t, s, "vol", m, false)
	fd := openFile(t, s.Path("vol"), unix.O_RDWR)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Size != 1<<20 {
		t.Fatalf("fstat: size %d, %v", st.Size, err)
	}

	m.grow(3 << 20)
	if err := s.Resized("vol"); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fstat(fd, &st); err != nil || st.Size != 3<<20 {
		t.Fatalf("fstat after Resized: size %d, %v; want %d", st.Size, err, 3<<20)
	}
	w := pattern(4096, 3)
	if _, err := unix.Pwrite(fd, w, 2<<20); err != nil {
		t.Fatalf("write in the grown range: %v", err)
	}
	if !bytes.Equal(m.bytes(2<<20, len(w)), w) {
		t.Fatal("write in the grown range did not reach the BlockFile")
	}
	if err := s.Resized("missing"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Resized(missing) = %v, want ErrNotExist", err)
	}
}

func TestRemove(t *testing.T) { eachTransport(t, testRemove) }

func testRemove(t *testing.T, o Options) {
	s := mount(t, o)
	s.releaseWait = 200 * time.Millisecond
	add(t, s, "vol", newMemFile(4096), false)
	if err := s.Add("vol", newMemFile(4096), false); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("second Add: %v, want ErrExist", err)
	}

	fd, err := unix.Open(s.Path("vol"), unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	err = s.Remove("vol")
	unix.Close(fd)
	if !errors.Is(err, ErrBusy) {
		t.Fatalf("Remove while open = %v, want ErrBusy", err)
	}
	// The kernel's RELEASE arrives after close returns; Remove waits
	// for it, and returns as soon as it came. 200 ms was too short once
	// on a loaded machine (two -race test binaries and a busy loop on 2
	// CPUs).
	s.releaseWait = 10 * time.Second
	if err := s.Remove("vol"); err != nil {
		t.Fatalf("Remove after close: %v", err)
	}
	if _, err := os.Stat(s.Path("vol")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("stat after Remove: %v, want ErrNotExist", err)
	}
	if err := s.Remove("vol"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("second Remove: %v, want ErrNotExist", err)
	}

	// The name can be served again, by a new file.
	m := newMemFile(8192)
	add(t, s, "vol", m, false)
	if fi, err := os.Stat(s.Path("vol")); err != nil || fi.Size() != 8192 {
		t.Fatalf("stat re-added file: %v, %v", fi, err)
	}
}

func TestNamespaceIsReadOnly(t *testing.T) { eachTransport(t, testNamespaceIsReadOnly) }

func testNamespaceIsReadOnly(t *testing.T, o Options) {
	s := mount(t, o)
	add(t, s, "b", newMemFile(8192), false)
	add(t, s, "a", newMemFile(4096), true)

	ents, err := os.ReadDir(s.Dir())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if !slices.Equal(names, []string{"a", "b"}) {
		t.Fatalf("ReadDir = %v, want [a b]", names)
	}

	for _, tc := range []struct {
		name string
		op   func() error
		want error
	}{
		{"create", func() error {
			_, err := os.Create(filepath.Join(s.Dir(), "new"))
			return err
		}, unix.EPERM},
		{"mkdir", func() error { return os.Mkdir(filepath.Join(s.Dir(), "d"), 0o700) }, unix.EPERM},
		{"unlink", func() error { return os.Remove(s.Path("b")) }, unix.EPERM},
		{"rename", func() error { return os.Rename(s.Path("b"), s.Path("c")) }, unix.EPERM},
		{"symlink", func() error { return os.Symlink("b", s.Path("l")) }, unix.EPERM},
		{"truncate to another size", func() error { return os.Truncate(s.Path("b"), 4096) }, unix.EINVAL},
		{"truncate to the same size", func() error { return os.Truncate(s.Path("b"), 8192) }, nil},
		{"chmod", func() error { return os.Chmod(s.Path("b"), 0o644) }, unix.EPERM},
		{"open read-only file for writing", func() error {
			f, err := os.OpenFile(s.Path("a"), os.O_RDWR, 0)
			if err == nil {
				f.Close()
			}
			return err
		}, unix.EROFS},
		{"getxattr", func() error {
			_, err := unix.Getxattr(s.Path("b"), "security.capability", make([]byte, 64))
			return err
		}, unix.EOPNOTSUPP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.op()
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
}

func TestErrnoMapping(t *testing.T) { eachTransport(t, testErrnoMapping) }

func testErrnoMapping(t *testing.T, o Options) {
	errNoSpace := errors.New("engine: out of space")
	o.Errno = func(err error) syscall.Errno {
		if errors.Is(err, errNoSpace) {
			return syscall.ENOSPC
		}
		return 0
	}
	s := mount(t, o)
	m := newMemFile(8192)
	add(t, s, "vol", m, false)
	fd := openFile(t, s.Path("vol"), unix.O_RDWR)

	for _, tc := range []struct {
		name string
		err  error
		want error
	}{
		{"wrapped errno", fmt.Errorf("layer: %w", syscall.ENOSPC), unix.ENOSPC},
		{"hook", fmt.Errorf("write: %w", errNoSpace), unix.ENOSPC},
		{"plain error", errors.New("checksum mismatch"), unix.EIO},
		// ENOSYS would make the kernel stop sending the operation.
		{"ENOSYS", syscall.ENOSYS, unix.EIO},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m.setErr(tc.err)
			if _, err := unix.Pwrite(fd, make([]byte, 512), 0); !errors.Is(err, tc.want) {
				t.Errorf("pwrite: %v, want %v", err, tc.want)
			}
			if err := unix.Fsync(fd); !errors.Is(err, tc.want) {
				t.Errorf("fsync: %v, want %v", err, tc.want)
			}
		})
	}
	// fsync still reaches the BlockFile after it failed with ENOSYS.
	m.setErr(nil)
	before, _ := m.counts()
	if err := unix.Fsync(fd); err != nil {
		t.Fatal(err)
	}
	if after, _ := m.counts(); after != before+1 {
		t.Fatal("fsync no longer reaches Flush")
	}
}

// TestStaleMount kills a server process without unmounting, as a crashed
// driver would leave it, and mounts again at the same place.
func TestStaleMount(t *testing.T) { eachTransport(t, testStaleMount) }

func testStaleMount(t *testing.T, o Options) {
	testutil.RequireRoot(t, testutil.DevFUSE)
	dir := filepath.Join(t.TempDir(), "mnt")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestHelperServer$")
	cmd.Env = append(os.Environ(), helperEnv+"="+dir, fmt.Sprintf("%s=%t", helperRingEnv, o.IOURing))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		// If the test failed before remounting, do not leave the
		// stale mount behind.
		_ = unix.Unmount(dir, unix.MNT_DETACH)
	})
	line := make([]byte, 6)
	if _, err := io.ReadFull(stdout, line); err != nil || string(line) != "ready\n" {
		t.Fatalf("helper server did not start: %q, %v", line, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "vol")); err != nil {
		t.Fatalf("helper's file: %v", err)
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	// ECANCELED, ECONNABORTED: a request caught between the exit and the
	// abort, which with FUSE over io_uring comes a moment after the exit
	// (the rings' teardown holds the connection until then).
	if _, err := os.Stat(dir); !isDeadConn(err) {
		t.Fatalf("stat of a crashed server's mount: %v, want ENOTCONN, ECANCELED or ECONNABORTED", err)
	}

	s, err := Mount(ctx, dir, o)
	if err != nil {
		t.Fatalf("Mount over a stale mount: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Unmount(); err != nil {
			t.Errorf("cleanup Unmount: %v", err)
		}
	})
	add(t, s, "vol2", newMemFile(4096), false)
	if _, err := os.Stat(s.Path("vol2")); err != nil {
		t.Fatal(err)
	}

	// A live mount is not stale: mounting over it is refused.
	if s2, err := Mount(ctx, dir, Options{}); err == nil {
		_ = s2.Unmount()
		t.Fatal("Mount over a live mount succeeded")
	}
}

// TestChildrenDoNotInheritConnection: a child process holding /dev/fuse
// would keep the connection of a crashed server alive (I/O hangs instead of
// failing, the stale mount is not recognized).
func TestChildrenDoNotInheritConnection(t *testing.T) {
	eachTransport(t, testChildrenDoNotInheritConnection)
}

func testChildrenDoNotInheritConnection(t *testing.T, o Options) {
	mount(t, o)
	out, err := exec.CommandContext(context.Background(), "sh", "-c", "ls -l /proc/$$/fd").CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if bytes.Contains(out, []byte("/dev/fuse")) {
		t.Fatalf("child process inherited /dev/fuse:\n%s", out)
	}
}

const (
	helperEnv     = "COWCSI_FUSEFS_HELPER_DIR"
	helperRingEnv = "COWCSI_FUSEFS_HELPER_RING"
)

// TestHelperServer is the server process of TestStaleMount; it only runs
// when that test starts it.
func TestHelperServer(t *testing.T) {
	dir := os.Getenv(helperEnv)
	if dir == "" {
		t.Skip("helper process for TestStaleMount")
	}
	s, err := Mount(context.Background(), dir, Options{IOURing: os.Getenv(helperRingEnv) == "true"})
	if err != nil {
		t.Fatal(err)
	}
	if on, err := s.IOURing(); os.Getenv(helperRingEnv) == "true" && !on {
		t.Fatalf("ring not in use: %v", err)
	}
	if err := s.Add("vol", newMemFile(4096), false); err != nil {
		t.Fatal(err)
	}
	fmt.Println("ready")
	select {} // until killed
}
