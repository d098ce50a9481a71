package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/cowcsi/cowcsi/test/testutil"
)

func TestFlags(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want int
	}{
		{"version", []string{"--version"}, 0},
		{"help", []string{"--help"}, 0},
		{"missing nodeid", []string{"--endpoint=unix:///tmp/x.sock"}, 2},
		{"tcp endpoint", []string{"--nodeid=n", "--endpoint=tcp://127.0.0.1:1"}, 2},
		{"relative store", []string{"--nodeid=n", "--store-dir=rel"}, 2},
		{"unknown flag", []string{"--nodeid=n", "--bogus"}, 2},
		{"stray argument", []string{"--nodeid=n", "extra"}, 2},
		{"bad duration", []string{"--nodeid=n", "--freeze-timeout=soon"}, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := run(tc.args); got != tc.want {
				t.Errorf("run(%q) = %d, want %d", tc.args, got, tc.want)
			}
		})
	}
}

// TestMain lets TestSignal run this test binary as the cowcsi command,
// and TestKillRandom as its writer and its freeze probe.
func TestMain(m *testing.M) {
	switch {
	case os.Getenv("COWCSI_TEST_MAIN") == "1":
		os.Exit(run(os.Args[1:]))
	case os.Getenv(envWriter) == "1":
		os.Exit(writerMain(os.Args[1:]))
	case os.Getenv(envProbe) == "1":
		os.Exit(probeMain(os.Args[1:]))
	}
	os.Exit(m.Run())
}

// TestSignal starts the binary, waits for its socket, sends SIGTERM and
// expects a clean exit with the socket removed.
func TestSignal(t *testing.T) {
	testutil.RequireRoot(t, testutil.DevFUSE)
	dir := t.TempDir()
	testutil.CleanupMounts(t, dir) // after a failed run; the test checks it unmounted
	sockDir := testutil.SocketDir(t)
	sock := filepath.Join(sockDir, "csi.sock")
	cmd := exec.Command(os.Args[0], "--nodeid=n1", "--endpoint=unix://"+sock, "--store-dir="+filepath.Join(dir, "store"))
	cmd.Env = append(os.Environ(), "COWCSI_TEST_MAIN=1")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if fi, err := os.Stat(sock); err == nil && fi.Mode()&os.ModeSocket != 0 {
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatal("socket did not appear")
		}
		time.Sleep(20 * time.Millisecond) // polling for the socket
	}
	// Give the driver time to finish mounting its FUSE filesystem, so
	// the stop path covers the whole shutdown.
	time.Sleep(500 * time.Millisecond) // not ordering: only widens coverage
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("cowcsi exited with %v after SIGTERM", err)
		}
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		t.Fatal("cowcsi did not stop within 60s of SIGTERM")
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
	if left, err := testutil.MountsUnder(dir); err == nil && len(left) > 0 {
		t.Errorf("mounts left under %s: %v", dir, left)
	}
}
