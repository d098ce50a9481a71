package driver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/klog/v2"

	"github.com/cowcsi/cowcsi/cow/fusefs"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// envHelperDriver makes the test binary run a driver (helperDriverMain)
// instead of the tests, so that a test can SIGKILL it.
const envHelperDriver = "COWCSI_TEST_HELPER_DRIVER"

// helperSpec is what the helper driver runs.
type helperSpec struct {
	Options Options `json:"options"`
	// GateDir holds the file gates: while <GateDir>/hold-<name> exists,
	// the engine's snapshots or the volumes' flushes wait, and the first
	// to wait creates <GateDir>/waiting-<name>.
	GateDir string `json:"gateDir"`
}

// fileGate is a gate between processes, polled.
type fileGate struct{ dir, name string }

func (g fileGate) pass() {
	hold := filepath.Join(g.dir, "hold-"+g.name)
	marked := false
	for {
		if _, err := os.Stat(hold); err != nil {
			return
		}
		if !marked {
			os.WriteFile(filepath.Join(g.dir, "waiting-"+g.name), nil, 0o644)
			marked = true
		}
		time.Sleep(10 * time.Millisecond) // polling the gate file
	}
}

type openGate struct{}

func (openGate) pass() {}

func helperDriverMain(spec string) int {
	var hs helperSpec
	if err := json.Unmarshal([]byte(spec), &hs); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	deps, _ := gatedDeps(fileGate{hs.GateDir, "snapshots"}, openGate{}, fileGate{hs.GateDir, "flushes"})
	d, err := New(hs.Options, deps)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := d.Run(ctx); err != nil {
		klog.ErrorS(err, "helper driver")
		return 1
	}
	return 0
}

// helperDriver is a driver in a child process of the test.
type helperDriver struct {
	cmd    *exec.Cmd
	exited chan struct{}
	conn   *grpc.ClientConn
	ctrl   csi.ControllerClient
	node   csi.NodeClient
	gates  string
	log    string
}

// startHelperDriver runs a driver for env in a child process (in its own
// process group, so that a test can kill it with its children as a
// container kill would) and waits until it is ready.
func startHelperDriver(t *testing.T, env *testEnv, opts Options) *helperDriver {
	t.Helper()
	h := &helperDriver{exited: make(chan struct{}), gates: filepath.Join(env.root, "gates"), log: filepath.Join(env.root, "helper.log")}
	if err := os.MkdirAll(h.gates, 0o755); err != nil {
		t.Fatal(err)
	}
	spec, err := json.Marshal(helperSpec{Options: opts, GateDir: h.gates})
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(h.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	h.cmd = exec.Command(os.Args[0], "-test.run=^$")
	h.cmd.Env = append(os.Environ(), envHelperDriver+"="+string(spec))
	h.cmd.Stdout, h.cmd.Stderr = logf, logf
	h.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { h.cmd.Wait(); close(h.exited) }()
	t.Cleanup(func() {
		syscall.Kill(-h.cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-h.exited:
		case <-time.After(30 * time.Second):
			t.Errorf("helper driver %d did not exit after SIGKILL", h.cmd.Process.Pid)
		}
		if t.Failed() {
			b, _ := os.ReadFile(h.log)
			t.Logf("helper driver log:\n%s", b)
		}
	})
	if h.conn, err = grpc.NewClient(opts.Endpoint, grpc.WithTransportCredentials(insecure.NewCredentials())); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.conn.Close() })
	h.ctrl, h.node = csi.NewControllerClient(h.conn), csi.NewNodeClient(h.conn)
	ident := csi.NewIdentityClient(h.conn)
	waitFor(t, "helper driver ready", 60*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		resp, err := ident.Probe(ctx, &csi.ProbeRequest{})
		return err == nil && resp.GetReady().GetValue()
	})
	return h
}

func (h *helperDriver) hold(t *testing.T, name string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(h.gates, "hold-"+name), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(filepath.Join(h.gates, "hold-"+name)) })
}

func (h *helperDriver) waitHeld(t *testing.T, name string) {
	t.Helper()
	waitFor(t, name+" held in the helper driver", 30*time.Second, func() bool {
		_, err := os.Stat(filepath.Join(h.gates, "waiting-"+name))
		return err == nil
	})
}

// children lists the helper driver's child processes.
func (h *helperDriver) children() []int {
	tasks, _ := filepath.Glob("/proc/" + strconv.Itoa(h.cmd.Process.Pid) + "/task/*/children")
	var out []int
	for _, f := range tasks {
		b, _ := os.ReadFile(f)
		for _, p := range strings.Fields(string(b)) {
			pid, _ := strconv.Atoi(p)
			out = append(out, pid)
		}
	}
	return out
}

// killAndWait SIGKILLs the helper driver (with its process group if group)
// and fails unless it exits within a bound. If it does not, its FUSE
// connection (this test's own) is aborted, so that the test machine does
// not keep a wedged process.
func (h *helperDriver) killAndWait(t *testing.T, group bool, fuseDir string) {
	t.Helper()
	pid := h.cmd.Process.Pid
	if group {
		pid = -pid
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.exited:
		return
	case <-time.After(30 * time.Second):
	}
	t.Errorf("the killed driver did not exit within 30s: a thread of it waits on its own FUSE connection")
	// From mountinfo: a stat of the mount would wait on the connection.
	mounts, _ := mountinfo.GetMounts(mountinfo.SingleEntryFilter(fuseDir))
	for _, m := range mounts {
		abort := fmt.Sprintf("/sys/fs/fuse/connections/%d/abort", m.Minor)
		t.Logf("aborting %s", abort)
		if err := os.WriteFile(abort, []byte("1"), 0o200); err != nil {
			t.Log(err)
		}
	}
	select {
	case <-h.exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("the killed driver did not exit even after its FUSE connection was aborted")
	}
}

// killTransports are the FUSE transports the kill tests run with.
func killTransports() []string {
	out := []string{FuseIOURingOff}
	if fusefs.IOURingSupported() {
		out = append(out, FuseIOURingOn)
	}
	return out
}

// TestKillDriverDuringLoopFlush: a driver SIGKILLed while the loop flush of
// a snapshot waits on its own FUSE connection exits, and so does the child
// that made the flush; a new driver then starts on the same store.
func TestKillDriverDuringLoopFlush(t *testing.T) {
	testutil.RequireRoot(t, nodeNeeds...)
	for _, transport := range killTransports() {
		t.Run("fuse-io-uring="+transport, func(t *testing.T) {
			env := newTestEnv(t)
			opts := testOptions(env)
			opts.FuseIOURing = transport
			h := startHelperDriver(t, env, opts)
			ctx := context.Background()
			vol, err := h.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{
				Name: "pvc-kill", VolumeCapabilities: []*csi.VolumeCapability{blockCap(rwo)},
				CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
			})
			if err != nil {
				t.Fatal(err)
			}
			id := vol.GetVolume().GetVolumeId()
			staging := filepath.Join(env.root, "staging", id)
			if _, err := h.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
				VolumeId: id, StagingTargetPath: staging, VolumeCapability: blockCap(rwo),
			}); err != nil {
				t.Fatal(err)
			}
			h.hold(t, "flushes")
			go h.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-kill", SourceVolumeId: id})
			h.waitHeld(t, "flushes")
			children := h.children()
			if len(children) == 0 {
				t.Error("the loop flush is not made by a child process")
			}
			h.killAndWait(t, false, opts.fuseDir())
			for _, c := range children {
				waitFor(t, fmt.Sprintf("child %d of the killed driver gone", c), 30*time.Second, func() bool {
					return processGone(c)
				})
			}
			td := startDriver(t, env)
			if _, err := td.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
				t.Errorf("NodeUnstageVolume after the restart: %v", err)
			}
		})
	}
}

// processGone reports whether pid has exited (gone, or a zombie).
func processGone(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if errors.Is(err, os.ErrNotExist) {
		return true
	}
	// The state follows the command name in parentheses.
	i := strings.LastIndexByte(string(b), ')')
	return err == nil && i > 0 && i+2 < len(b) && b[i+2] == 'Z'
}

// TestRestartThawsFreezeOfKilledDriver: a driver killed (with its children,
// as a container kill does) while it holds a snapshot freeze leaves the
// filesystem frozen, and unmounting does not thaw it; the next driver
// thaws it from its record before anything else. Killed alone, the driver
// leaves nothing frozen even before the restart: its freeze child sees
// its standard input end and thaws.
func TestRestartThawsFreezeOfKilledDriver(t *testing.T) {
	testutil.RequireRoot(t, nodeNeeds...)
	for _, group := range []bool{true, false} {
		t.Run(fmt.Sprintf("group=%v", group), func(t *testing.T) { testRestartThaws(t, group) })
	}
}

func testRestartThaws(t *testing.T, group bool) {
	env := newTestEnv(t)
	opts := testOptions(env)
	opts.FreezeTimeout = 60 * time.Second
	h := startHelperDriver(t, env, opts)
	ctx := context.Background()
	vol, err := h.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{
		Name: "pvc-frozen-kill", VolumeCapabilities: []*csi.VolumeCapability{mountCap(rwo, "ext4")},
		CapacityRange: &csi.CapacityRange{RequiredBytes: 64 << 20},
	})
	if err != nil {
		t.Fatal(err)
	}
	id := vol.GetVolume().GetVolumeId()
	staging := filepath.Join(env.root, "staging", id)
	if _, err := h.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
		VolumeId: id, StagingTargetPath: staging, VolumeCapability: mountCap(rwo, "ext4"),
	}); err != nil {
		t.Fatal(err)
	}
	// Keeps the filesystem reachable after the restart's teardown
	// detaches its mount.
	fd, err := unix.Open(staging, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// Never leave it frozen, whatever failed: the last close of a
		// detached mount shuts the filesystem down, which waits for a
		// thaw.
		unix.IoctlSetInt(fd, testFITHAW, 0)
		unix.Close(fd)
	})
	h.hold(t, "snapshots")
	go h.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "snap-frozen-kill", SourceVolumeId: id})
	h.waitHeld(t, "snapshots")
	children := h.children()
	h.killAndWait(t, group, opts.fuseDir())
	if !group {
		for _, c := range children {
			waitFor(t, fmt.Sprintf("child %d of the killed driver gone", c), 30*time.Second, func() bool { return processGone(c) })
		}
		if frozenFD(t, fd) {
			t.Fatal("the freeze child of a killed driver left the filesystem frozen")
		}
	} else if !frozenFD(t, fd) {
		t.Fatal("precondition: the filesystem is not frozen after the kill")
	}
	td := startDriver(t, env)
	if frozenFD(t, fd) {
		t.Fatal("the restarted driver left the filesystem frozen")
	}
	if recs, err := td.d.node.state.loadFreezes(); err != nil || len(recs) != 0 {
		t.Errorf("freeze records left after the restart: %v, %v", recs, err)
	}
	if _, err := td.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging}); err != nil {
		t.Errorf("NodeUnstageVolume after the restart: %v", err)
	}
}
