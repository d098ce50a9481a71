package e2e

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/klog/v2"
)

// The two nodes every test may use.
const (
	nodeA = "node-a"
	nodeB = "node-b"
)

var (
	theCluster *cluster
	setupErr   error
	skipReason string
)

// TestMain starts one control plane with two nodes for all the tests (about
// ten seconds once the binaries are built) and tears it down after them.
func TestMain(m *testing.M) {
	flag.Parse()
	// client-go reports a watch ended by its context as an error; the
	// tests end watches that way all the time.
	klog.SetLogger(logr.Discard())
	os.Exit(run(m))
}

func run(m *testing.M) int {
	switch {
	case os.Geteuid() != 0:
		skipReason = "needs root: the driver mounts, attaches loop devices and serves FUSE"
	case testing.Short():
		skipReason = "-short: the e2e tests start a Kubernetes control plane"
	case len(testsToRun()) == 0:
		skipReason = "no test selected"
	}
	if skipReason != "" {
		return m.Run()
	}
	base := os.TempDir()
	sweepStale(base)
	dir, err := os.MkdirTemp(base, "cowcsi-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := os.WriteFile(filepath.Join(dir, "pid"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx := context.Background()
	start := time.Now()
	theCluster, setupErr = setup(ctx, dir)
	if setupErr == nil {
		fmt.Fprintf(os.Stderr, "e2e: control plane and nodes %s, %s up in %v (logs in %s)\n", nodeA, nodeB, time.Since(start).Round(time.Millisecond), theCluster.logDir)
	}
	code := m.Run()
	if theCluster != nil {
		if err := theCluster.stop(); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: teardown: %v\n", err)
			code = 1
		}
	}
	// Whatever is still mounted or attached now was leaked by a failed test
	// (or the driver); release it so the machine stays clean.
	released, err := releaseUnder(dir)
	if len(released) > 0 {
		fmt.Fprintf(os.Stderr, "e2e: released after teardown: %s\n", strings.Join(released, ", "))
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
		code = 1
	}
	if code != 0 || os.Getenv("COWCSI_E2E_KEEP") != "" {
		_ = os.WriteFile(filepath.Join(dir, "kept"), nil, 0o644)
		fmt.Fprintf(os.Stderr, "e2e: kept %s for the logs\n", dir)
	} else {
		_ = os.RemoveAll(dir)
	}
	return code
}

func setup(ctx context.Context, dir string) (*cluster, error) {
	bins, err := findBinaries(dir)
	if err != nil {
		return nil, err
	}
	c, err := startCluster(ctx, dir, bins)
	if err != nil {
		return nil, err
	}
	for _, name := range []string{nodeA, nodeB} {
		if _, err := c.addNode(ctx, name); err != nil {
			err = fmt.Errorf("node %s: %w%s", name, err, c.logHint())
			_ = c.stop()
			return nil, err
		}
	}
	return c, nil
}

// testsToRun says whether -test.run selects anything here; `go test -run
// Foo ./...` should not start a control plane for nothing.
func testsToRun() []string {
	f := flag.Lookup("test.run")
	if f == nil || f.Value.String() == "" {
		return []string{"all"}
	}
	pattern := f.Value.String()
	if pattern == "^$" || pattern == "XXX" {
		return nil
	}
	return []string{pattern}
}

// needCluster returns the shared cluster, or skips or fails the test.
func needCluster(t *testing.T) *cluster {
	t.Helper()
	if skipReason != "" {
		t.Skip(skipReason)
	}
	if setupErr != nil {
		t.Fatalf("cluster setup: %v", setupErr)
	}
	if err := theCluster.dead(); err != nil {
		t.Fatalf("cluster: %v", err)
	}
	return theCluster
}

func (c *cluster) node(t *testing.T, name string) *node {
	t.Helper()
	for _, n := range c.nodes {
		if n.name == name {
			return n
		}
	}
	t.Fatalf("no node %s", name)
	return nil
}
