package driver

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/fusefs"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// stuckFile is a BlockFile whose reads never return: the request stays with
// the server, as one does when a server is killed while serving it.
type stuckFile struct{ entered chan struct{} }

func (f *stuckFile) ReadAt(p []byte, off int64) (int, error) {
	select {
	case f.entered <- struct{}{}:
	default:
	}
	select {}
}
func (f *stuckFile) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }
func (f *stuckFile) Flush() error                             { return nil }
func (f *stuckFile) Discard(off, length int64) error          { return nil }
func (f *stuckFile) Size() int64                              { return 1 << 20 }

// wedgeHelper plays a driver that gets killed while one of its own threads
// waits on its own FUSE connection: it takes the instance lock of
// storeDir, serves "stuck" and "ok" at storeDir/fuse, reads "stuck" from
// another thread and prints "blocked" once the server holds that read.
func wedgeHelper(storeDir string) int {
	lock, err := lockInstance(storeDir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer lock.Close()
	s, err := fusefs.Mount(context.Background(), filepath.Join(storeDir, "fuse"), fusefs.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	stuck := &stuckFile{entered: make(chan struct{}, 1)}
	if err := errors.Join(s.Add("stuck", stuck, true), s.Add("ok", &memFile{data: make([]byte, 1<<20)}, true)); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	go func() {
		fd, err := unix.Open(s.Path("stuck"), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		_, _ = unix.Pread(fd, make([]byte, 4096), 0)
		fmt.Fprintln(os.Stderr, "the stuck read returned")
		os.Exit(1)
	}()
	<-stuck.entered
	fmt.Println("blocked")
	select {}
}

// TestTakeoverFromStuckInstance: a previous instance killed while a thread
// of it waited on its own FUSE connection cannot exit and keeps the
// instance lock (lockInstance refuses). A live holder is left alone;
// once the holder is killed, takeInstance aborts the connection, the
// process exits and the lock is taken.
func TestTakeoverFromStuckInstance(t *testing.T) {
	testutil.RequireRoot(t, nodeNeeds...)
	store := t.TempDir()
	fuseDir := filepath.Join(store, "fuse")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "COWCSI_WEDGE_STORE="+store)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{}) // closed once the helper is reaped
	t.Cleanup(func() {
		// On failure paths: free the helper, whatever state it is in.
		_ = cmd.Process.Kill()
		if conns, err := fusefs.Connections(fuseDir); err == nil {
			for _, c := range conns {
				_ = fusefs.AbortConnection(c)
			}
		}
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			t.Errorf("helper pid %d did not exit: %v", cmd.Process.Pid, taskStates(cmd.Process.Pid))
		}
		_ = unix.Unmount(fuseDir, unix.MNT_DETACH)
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	go func() { _ = cmd.Wait(); close(exited) }()
	if strings.TrimSpace(line) != "blocked" {
		t.Fatalf("helper: %q, %v", line, err)
	}

	// Alive: refused, and its connection still serves.
	if _, err := takeInstance(context.Background(), store, fuseDir); !errors.Is(err, errAnotherInstance) {
		t.Fatalf("takeInstance with a live holder: %v, want errAnotherInstance", err)
	}
	if b, err := os.ReadFile(filepath.Join(fuseDir, "ok")); err != nil || len(b) != 1<<20 {
		t.Fatalf("the live instance's connection no longer serves: %d bytes, %v", len(b), err)
	}

	// Killed: its reader waits for an answer nobody will send.
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a thread of the killed helper in D state", 10*time.Second, func() bool {
		for _, s := range taskStates(cmd.Process.Pid) {
			if strings.Contains(s, ":D:") {
				return true
			}
		}
		return false
	})
	if _, err := lockInstance(store); !errors.Is(err, errAnotherInstance) {
		t.Fatalf("lockInstance with a stuck holder: %v, want errAnotherInstance", err)
	}
	lock, err := takeInstance(context.Background(), store, fuseDir)
	if err != nil {
		t.Fatalf("takeInstance with a stuck holder: %v", err)
	}
	lock.Close()
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		t.Fatalf("the stuck helper did not exit after takeInstance: %v", taskStates(cmd.Process.Pid))
	}
}

// TestExiting reads this process (alive) and a zombie child.
func TestExiting(t *testing.T) {
	if exiting(os.Getpid()) {
		t.Fatal("this process reads as exiting")
	}
	cmd := exec.Command("true")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	// Not reaped yet: a zombie once it has exited.
	waitFor(t, "the child to become a zombie", 10*time.Second, func() bool { return exiting(pid) })
	_ = cmd.Wait()
	if exiting(pid) {
		t.Fatal("a reaped pid reads as exiting")
	}
}
