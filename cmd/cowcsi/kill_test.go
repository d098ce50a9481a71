package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow/loopdev"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// TestKillRandom is the kill -9 fault-injection test of the real binary.
// Each trial starts cowcsi on a fresh store (FUSE transport chosen at
// random), stages and publishes a block and an ext4 volume, starts a
// writer in its own mount namespace (fsync'd writes on both), runs a
// random mix of CreateSnapshot with freeze, NodeStage/NodeUnstage,
// expansion and graceful shutdown, and kills the driver with SIGKILL at a
// random moment, often while a CreateSnapshot flushes or freezes. Then the
// killed process must exit, nothing of the test may be left in D state or
// frozen, the driver must restart on the same store, no acknowledged
// write may be lost, and every snapshot that returned OK must be listed
// and restore with every write acknowledged before it was asked for.
//
// COWCSI_KILL_TRIALS sets the number of trials (default 30; make
// kill-long runs 300), COWCSI_KILL_SEED the first trial's seed (trial i
// uses seed+i), COWCSI_KILL_TRANSPORT forces "on" (io_uring) or "off"
// (/dev/fuse), and COWCSI_KILL_KEEPGOING=1 runs every trial even after
// one failed (by default the test stops there: a wedged kernel object may
// spoil the next trials). A seed fixes the trial's choices (transport,
// operations, kill delay), not the kernel's timing: a repeated seed
// reproduces a failure often, not always.
func TestKillRandom(t *testing.T) {
	testutil.RequireRoot(t, testutil.DevFUSE, testutil.DevLoopControl, "mkfs.ext4", "mount", "blkid")
	trials := envInt(t, "COWCSI_KILL_TRIALS", 30)
	seed := int64(envInt(t, "COWCSI_KILL_SEED", int(time.Now().UnixNano()%1e9)))
	t.Logf("seed %d, %d trials (repeat: COWCSI_KILL_SEED=%d)", seed, trials, seed)
	bin := buildCowcsi(t)
	kw := openKmsg()
	if kw == nil {
		t.Log("cannot read /dev/kmsg: the ent-req-queue check is off")
	} else {
		defer kw.close()
	}
	// Orphans (children of a killed driver) come to this process, so
	// that the checks see every process the test started.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatalf("PR_SET_CHILD_SUBREAPER: %v", err)
	}
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
	var st killStats
	start := time.Now()
	for i := range trials {
		s := seed + int64(i)
		ok := t.Run(fmt.Sprintf("trial%03d_seed%d", i, s), func(t *testing.T) { runKillTrial(t, bin, s, kw, &st) })
		if !ok && os.Getenv("COWCSI_KILL_KEEPGOING") == "" {
			t.Logf("stopping after the first failed trial; COWCSI_KILL_KEEPGOING=1 runs the rest, COWCSI_KILL_SEED=%d COWCSI_KILL_TRIALS=1 repeats it", s)
			break
		}
	}
	st.finalKmsgCheck(t, kw)
	t.Logf("%s; %v in all, %v per trial", st.summary(), time.Since(start).Round(time.Millisecond),
		(time.Since(start) / time.Duration(max(st.trials, 1))).Round(time.Millisecond))
}

// buildCowcsi builds the command into the test's directory, without the
// race detector whatever this test binary was built with: the trials run
// the driver at its own speed. COWCSI_KILL_BINARY names a binary to use
// instead.
func buildCowcsi(t *testing.T) string {
	if p := os.Getenv("COWCSI_KILL_BINARY"); p != "" {
		return p
	}
	// go test puts its own go command first in PATH.
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("building cowcsi: %v (or set COWCSI_KILL_BINARY)", err)
	}
	bin := filepath.Join(t.TempDir(), "cowcsi")
	start := time.Now()
	if out, err := exec.Command(gobin, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	t.Logf("built %s in %v", bin, time.Since(start).Round(time.Millisecond))
	return bin
}

func envInt(t *testing.T, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, v, err)
	}
	return n
}

const (
	// exitBound is how long a killed driver, or a killed writer, may take
	// to exit.
	exitBound = 15 * time.Second
	// killVolSize is each test volume's size; the writer cycles over
	// all its blocks.
	killVolSize = 32 << 20
	callTimeout = time.Minute
)

// killVolume is one of a trial's volumes.
type killVolume struct {
	id, staging, target string
	block               bool
}

// snapRecord is a CreateSnapshot that returned OK, with the writer's last
// acknowledged number on its volume when the call was made.
type snapRecord struct {
	name, id  string
	block     bool
	ackedAt   int64
	sizeBytes int64
}

type killTrial struct {
	t                 *testing.T
	bin               string
	seed              int64
	rng               *rand.Rand
	prefix            string
	root, sock, store string
	logPath           string
	log               *os.File
	kmsg              *kmsgWatch
	plugins           []*plugin
	blk, fs, extra    killVolume
	ids               []string
	writer            *writerProc

	mu      sync.Mutex
	snaps   []snapRecord
	nextID  int
	running map[string]int // calls in flight, by name
	conns   []int          // the FUSE connections of this trial's drivers
	connOf  map[int]int    // driver pid -> its FUSE connection
	old     []int          // processes left by earlier trials
}

func newKillTrial(t *testing.T, bin string, seed int64, kw *kmsgWatch) *killTrial {
	root := t.TempDir()
	tr := &killTrial{t: t, bin: bin, seed: seed, rng: rand.New(rand.NewPCG(uint64(seed), 0x6b696c6c)),
		prefix: fmt.Sprintf("kill-%d-%x", seed, time.Now().UnixNano()&0xffffff),
		root:   root, sock: filepath.Join(testutil.SocketDir(t), "csi.sock"), store: filepath.Join(root, "store"),
		logPath: filepath.Join(root, "driver.log"), kmsg: kw, running: map[string]int{}, connOf: map[int]int{}, old: started()}
	f, err := os.Create(tr.logPath)
	if err != nil {
		t.Fatal(err)
	}
	tr.log = f
	t.Cleanup(tr.cleanup)
	return tr
}

// launch starts a driver on the trial's store with a random FUSE
// transport (or the one COWCSI_KILL_TRANSPORT forces).
func (tr *killTrial) launch() (*plugin, string, error) {
	transport := os.Getenv("COWCSI_KILL_TRANSPORT")
	if transport == "" {
		transport = []string{"on", "off"}[tr.rng.IntN(2)]
	}
	p, err := launchPlugin(tr.bin, tr.sock, tr.store, tr.log, "--fuse-io-uring="+transport)
	if err == nil {
		tr.plugins = append(tr.plugins, p)
		for _, c := range fuseConnsUnder(tr.root) {
			if !slices.Contains(tr.conns, c) {
				tr.conns = append(tr.conns, c)
				tr.connOf[p.pid()] = c
			}
		}
	}
	return p, transport, err
}

func killCap(block bool) *csi.VolumeCapability {
	vc := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	if block {
		vc.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
	} else {
		vc.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}}
	}
	return vc
}

// createVolume creates volume role (from snapshot src if not empty).
func (tr *killTrial) createVolume(p *plugin, role string, block bool, src string) (killVolume, error) {
	req := &csi.CreateVolumeRequest{Name: tr.prefix + "-" + role, VolumeCapabilities: []*csi.VolumeCapability{killCap(block)}}
	if src == "" {
		req.CapacityRange = &csi.CapacityRange{RequiredBytes: killVolSize}
	} else {
		req.VolumeContentSource = &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: src}}}
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	resp, err := p.ctrl.CreateVolume(ctx, req)
	if err != nil {
		return killVolume{}, fmt.Errorf("CreateVolume %s: %w", role, err)
	}
	v := killVolume{id: resp.GetVolume().GetVolumeId(), block: block,
		staging: filepath.Join(tr.root, "staging", role), target: filepath.Join(tr.root, "pod", role)}
	tr.mu.Lock()
	tr.ids = append(tr.ids, v.id)
	tr.mu.Unlock()
	return v, nil
}

func (tr *killTrial) stage(ctx context.Context, p *plugin, v killVolume) error {
	_, err := p.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: killCap(v.block)})
	return err
}

func (tr *killTrial) publish(ctx context.Context, p *plugin, v killVolume) error {
	_, err := p.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging,
		TargetPath: v.target, VolumeCapability: killCap(v.block)})
	return err
}

// setup creates, stages and publishes the block and the ext4 volume and
// creates the third volume that the operations stage and unstage.
func (tr *killTrial) setup(p *plugin) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	var err error
	if tr.blk, err = tr.createVolume(p, "blk", true, ""); err != nil {
		return err
	}
	if tr.fs, err = tr.createVolume(p, "fs", false, ""); err != nil {
		return err
	}
	if tr.extra, err = tr.createVolume(p, "extra", tr.rng.IntN(2) == 0, ""); err != nil {
		return err
	}
	for _, v := range []killVolume{tr.blk, tr.fs} {
		if err := tr.stage(ctx, p, v); err != nil {
			return fmt.Errorf("NodeStageVolume %s: %w", v.id, err)
		}
		if err := tr.publish(ctx, p, v); err != nil {
			return fmt.Errorf("NodePublishVolume %s: %w", v.id, err)
		}
	}
	return nil
}

// cleanup runs on every path: it thaws what a failed trial may have left
// frozen, kills the writer and the drivers, aborts this trial's FUSE
// connections, detaches its loop devices and unmounts everything below
// its directory.
func (tr *killTrial) cleanup() {
	t := tr.t
	if t.Failed() {
		for _, p := range tr.freezable() {
			if out, err := runProbe("thaw", p); out == "thawed" || err != nil {
				t.Logf("cleanup: thaw %s: %s %v", p, out, err)
			}
		}
	}
	if w := tr.writer; w != nil {
		w.cmd.Process.Kill()
		if !waitClosed(w.exited, exitBound) {
			t.Errorf("cleanup: writer (pid %d) did not exit after SIGKILL:\n%s", w.pid(), dumpProc(w.pid()))
		}
	}
	killOrphans(t)
	for _, p := range tr.plugins {
		p.conn.Close()
		p.cmd.Process.Kill()
		if !p.waitExit(exitBound) {
			t.Errorf("cleanup: driver (pid %d) did not exit after SIGKILL; aborting FUSE connections %v:\n%s",
				p.pid(), abortFuseUnder(tr.root), dumpProc(p.pid()))
			p.waitExit(exitBound)
		}
	}
	abortFuseUnder(tr.root)
	for _, c := range tr.conns {
		if _, stuck := stuckConn(c, tr.root); stuck {
			t.Logf("cleanup: aborting FUSE connection %d of a killed driver", c)
			os.WriteFile(fmt.Sprintf("/sys/fs/fuse/connections/%d/abort", c), []byte("1"), 0o200)
		}
	}
	tr.clearLoops()
	testutil.UnmountAll(t, tr.root)
	tr.log.Close()
	if t.Failed() {
		tr.logTail()
	}
}

// clearLoops detaches the loop devices bound to this trial's FUSE files:
// by full path while the FUSE mount is there, by the bare name the kernel
// keeps once it was detached (the IDs carry the trial's unique prefix).
func (tr *killTrial) clearLoops() {
	bound, _ := loopdev.Bindings()
	tr.mu.Lock()
	ids := slices.Clone(tr.ids)
	tr.mu.Unlock()
	for _, b := range bound {
		if strings.HasPrefix(b.BackingFile, tr.root+"/") || slices.Contains(ids, strings.TrimPrefix(b.BackingFile, "/")) {
			clearLoop(tr.t, b.Path)
		}
	}
}

// freezable lists the mount roots of this trial that a dead driver may
// have left frozen: the ext4 staging paths, and the ext4 volume as the
// writer's mount namespace still holds it (the old mount).
func (tr *killTrial) freezable() []string {
	var out []string
	for _, v := range []killVolume{tr.fs, tr.extra} {
		if v.id != "" && !v.block {
			if ok, _ := isMountPoint(v.staging); ok {
				out = append(out, v.staging)
			}
		}
	}
	if w := tr.writer; w != nil && !isClosed(w.exited) && tr.fs.id != "" {
		out = append(out, fmt.Sprintf("/proc/%d/root%s", w.pid(), tr.fs.target))
	}
	return out
}

func (tr *killTrial) logTail() {
	b, err := os.ReadFile(tr.logPath)
	if err != nil {
		return
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	tr.t.Logf("last lines of the drivers' log (%s):\n%s", tr.logPath, strings.Join(lines[max(0, len(lines)-60):], "\n"))
}

func waitClosed(c <-chan struct{}, bound time.Duration) bool {
	select {
	case <-c:
		return true
	case <-time.After(bound):
		return false
	}
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
