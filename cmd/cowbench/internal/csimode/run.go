package csimode

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/bench"
)

// volume is a volume cowbench created, and how far it is attached.
type volume struct {
	name, id string
	size     int64
	source   *csi.VolumeContentSource // a snapshot (restore) or volume (clone)
	context  map[string]string        // volume_context, handed to the node calls
	publish  map[string]string        // publish_context of ControllerPublishVolume
	// How far the volume is attached; cleanup undoes what is set. Paths
	// are set before the call that may stage or publish there.
	staging, target string
	ctrlPublished   bool
}

// snapshot is a snapshot cowbench created.
type snapshot struct {
	name, id string
	size     int64
	src      *volume
}

// runner holds one run's state.
type runner struct {
	cfg     Config
	d       *driverConn
	rec     *bench.Recorder
	prog    *bench.Progress
	runID   string
	kubelet string // root of the staging and target paths
	podUID  string
	cap     *csi.VolumeCapability
	clone   bool
	attach  bool // the driver wants ControllerPublishVolume

	notReady atomic.Int64 // CreateSnapshot answers with ready_to_use=false

	mu    sync.Mutex
	vols  map[*volume]bool // created and not deleted
	snaps map[*snapshot]bool
}

// Run benchmarks the driver cfg names (or a cowcsi it starts) and returns
// the result. Everything it creates is deleted before it returns, whether
// the run completed, failed, or ctx ended (Ctrl-C, --timeout); what could
// not be deleted is in the returned error. The result is returned, with
// what was measured, even when err is not nil, unless nothing was measured.
func Run(ctx context.Context, cfg Config, prog *bench.Progress) (res *bench.Result, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	started := time.Now()
	workDir, ownWorkDir, err := makeWorkDir(cfg)
	if err != nil {
		return nil, err
	}
	var proc *cowcsiProc
	var d *driverConn
	defer func() {
		// Last: stop the driver we started, then remove the work
		// directory, unless something is still mounted under it.
		if proc != nil {
			err = errors.Join(err, proc.stop())
		}
		if ownWorkDir {
			err = errors.Join(err, removeWorkDir(workDir))
		}
	}()
	proc, d, err = connect(ctx, cfg, workDir)
	if err != nil {
		return nil, err
	}
	defer d.Close()

	r, notes := newRunner(cfg, d, prog, workDir)
	prog.AddTotal(cfg.Total(r.cellOps))
	defer bench.CleanUp(&err, cfg.CleanupTimeout, r.cleanup)
	cfg.Measure(ctx, prog, r.cell)
	return r.result(ctx, started, notes), nil
}

// makeWorkDir returns the directory for the driver cowbench starts and for
// the staging and target paths: cfg.WorkDir, or a temporary one (own) when
// one is needed and none is given.
func makeWorkDir(cfg Config) (dir string, own bool, err error) {
	dir = cfg.WorkDir
	if dir == "" && (cfg.StartDriver || (cfg.StagingDir == "" && cfg.Write > 0)) {
		if dir, err = os.MkdirTemp("/var/tmp", "cowbench-"); err != nil {
			return "", false, err
		}
		own = true
	}
	if dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return dir, own, err
		}
	}
	return dir, own, nil
}

// connect starts cowcsi in workDir if cfg asks for it, dials the driver
// and discovers what it can do. proc is the started driver, returned even
// with an error so that the caller stops it.
func connect(ctx context.Context, cfg Config, workDir string) (proc *cowcsiProc, d *driverConn, err error) {
	endpoint := cfg.Endpoint
	var alive func() error
	if cfg.StartDriver {
		bin, err := findCowcsi(cfg.CowcsiPath)
		if err != nil {
			return nil, nil, err
		}
		if proc, err = startCowcsi(bin, workDir); err != nil {
			return nil, nil, err
		}
		endpoint, alive = proc.endpoint, proc.alive
	}
	d, err = dial(ctx, endpoint, cfg.ConnectTimeout, cfg.StartDriver, alive)
	if err != nil {
		return proc, nil, err
	}
	if err := d.discover(ctx, cfg.Write > 0); err != nil {
		d.Close()
		return proc, nil, err
	}
	return proc, d, nil
}

// newRunner sets up a run against d, and returns with it the notes on
// what the driver's capabilities change in the run.
func newRunner(cfg Config, d *driverConn, prog *bench.Progress, workDir string) (*runner, []string) {
	r := &runner{cfg: cfg, d: d, prog: prog, rec: bench.NewRecorder(cfg.OpTimeout, prog),
		runID: "cowbench-" + randomHex(3), podUID: newUUID(),
		vols: map[*volume]bool{}, snaps: map[*snapshot]bool{}}
	r.kubelet = cfg.StagingDir
	if r.kubelet == "" && workDir != "" {
		r.kubelet = filepath.Join(workDir, "kubelet")
	}
	r.cap = &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	if cfg.Access == bench.AccessBlock {
		r.cap.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
	} else {
		r.cap.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: cfg.FsType}}
	}
	var notes []string
	r.clone = cfg.Clone && d.canClone()
	if cfg.Clone && !r.clone {
		notes = append(notes, fmt.Sprintf("clone skipped: %s does not have the CLONE_VOLUME controller capability", d.name))
	}
	if cfg.Write > 0 {
		r.attach = d.ctrlCaps[csi.ControllerServiceCapability_RPC_PUBLISH_UNPUBLISH_VOLUME]
		if r.attach {
			notes = append(notes, "the driver has PUBLISH_UNPUBLISH_VOLUME: ControllerPublishVolume is called before staging, as the attach/detach controller would")
		}
		if !d.staged() {
			notes = append(notes, "the driver has no STAGE_UNSTAGE_VOLUME: volumes are published without NodeStageVolume")
		}
	}
	return r, notes
}

// result is the run's result once its cells are done (or ctx ended).
func (r *runner) result(ctx context.Context, started time.Time, notes []string) *bench.Result {
	if n := r.notReady.Load(); n > 0 {
		notes = append(notes, fmt.Sprintf("%d CreateSnapshot answers had ready_to_use=false: such snapshots are timed until CreateSnapshot says ready, called again with backoff as csi-snapshotter does", n))
	}
	res := &bench.Result{Mode: "csi", Target: r.target(), Command: os.Args, Started: started,
		Settings: r.settings(), Rows: r.rec.Rows(), Notes: notes, Errors: r.rec.Failures()}
	res.End(ctx)
	return res
}

func (r *runner) target() string {
	s := fmt.Sprintf("%s %s at %s", r.d.name, r.d.version, r.d.endpoint)
	if r.cfg.StartDriver {
		s = fmt.Sprintf("%s %s (started by cowbench on a temporary store)", r.d.name, r.d.version)
	}
	if id := r.d.nodeInfo.GetNodeId(); id != "" {
		s += ", node " + id
	}
	return s
}

func (r *runner) settings() []bench.Setting {
	write := "nothing"
	if r.cfg.Write > 0 {
		how := "to a file through the page cache, then fsync"
		if r.cfg.Access == bench.AccessBlock {
			how = "to the block device with O_DIRECT, then fsync"
		}
		write = fmt.Sprintf("%s of random data per source volume, %s", bench.SizeLabel(r.cfg.Write), how)
	}
	access := r.cfg.Access
	if r.cfg.Access == bench.AccessMount {
		access += " (fs " + orDefault(r.cfg.FsType, "driver default") + ")"
	}
	s := append(r.cfg.Settings(),
		bench.Setting{Name: "access", Value: access},
		bench.Setting{Name: "written", Value: write})
	if r.cfg.Write > 0 {
		online := "while staged and published (as with a running pod)"
		if !r.cfg.Online {
			online = "after unpublish and unstage"
		}
		s = append(s, bench.Setting{Name: "taken", Value: "snapshots " + online})
	}
	if len(r.cfg.Parameters) > 0 {
		s = append(s, bench.Setting{Name: "parameters", Value: joinMap(r.cfg.Parameters)})
	}
	if len(r.cfg.SnapshotParameters) > 0 {
		s = append(s, bench.Setting{Name: "snapshot params", Value: joinMap(r.cfg.SnapshotParameters)})
	}
	return s
}

// cellOps counts the operations of one cell at concurrency level conc.
func (r *runner) cellOps(conc int) int {
	n, s := r.cfg.VolumesFor(conc), r.cfg.Snapshots
	ops := n + n*s + n*s + n*s + n + n*s // create, snapshot, restore, delete snapshot, delete volumes
	if r.clone {
		ops += 2 * n
	}
	if r.cfg.Write > 0 {
		perVol := 3 // publish, write, unpublish
		if r.d.staged() {
			perVol += 2
		}
		if r.attach {
			perVol += 2
		}
		ops += n * perVol
	}
	return ops
}

// cell measures one volume size at one concurrency level.
func (r *runner) cell(ctx context.Context, size int64, conc int) {
	n, nsnap := r.cfg.VolumesFor(conc), r.cfg.Snapshots
	phase := func(op string, planned int) bench.Phase {
		return bench.Phase{Key: bench.Key{Op: op, Size: size, Concurrency: conc}, Planned: planned}
	}
	tag := fmt.Sprintf("%s-%s-c%d", r.runID, strings.ToLower(bench.SizeLabel(size)), conc)
	var created []*volume // every volume of the cell, deleted at its end

	sources := make([]*volume, n)
	for i := range sources {
		sources[i] = &volume{name: fmt.Sprintf("%s-v%d", tag, i), size: size}
	}
	sources = bench.Each(ctx, r.rec, phase(bench.OpCreateVolume, n), sources, r.createVolume)
	created = append(created, sources...)

	// The volumes with data, which the snapshots and clones are of.
	written := sources
	if r.cfg.Write > 0 {
		written = r.attachAndWrite(ctx, phase, n, sources)
		if !r.cfg.Online {
			r.detach(ctx, phase, n, sources)
		}
	}

	snaps := bench.Rounds(ctx, r.rec, phase(bench.OpCreateSnapshot, n), nsnap, written, func(v *volume, k int) *snapshot {
		return &snapshot{name: fmt.Sprintf("%s-s%d", v.name, k), src: v}
	}, r.createSnapshot)
	if r.cfg.Write > 0 && r.cfg.Online {
		r.detach(ctx, phase, n, sources)
	}

	restores := make([]*volume, len(snaps))
	for i, s := range snaps {
		restores[i] = &volume{name: s.name + "-restore", size: max(size, s.size),
			source: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
				Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: s.id}}}}
	}
	restores = bench.Each(ctx, r.rec, phase(bench.OpRestore, n*nsnap), restores, r.createVolume)
	created = append(created, restores...)

	if r.clone {
		clones := make([]*volume, len(written))
		for i, v := range written {
			clones[i] = &volume{name: v.name + "-clone", size: size,
				source: &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{
					Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: v.id}}}}
		}
		clones = bench.Each(ctx, r.rec, phase(bench.OpClone, n), clones, r.createVolume)
		created = append(created, clones...)
	}

	bench.Each(ctx, r.rec, phase(bench.OpDeleteSnapshot, n*nsnap), snaps, r.deleteSnapshot)
	planned := n + n*nsnap
	if r.clone {
		planned += n
	}
	// Sources that failed to attach were dropped from sources but not from
	// created: every volume the cell made is deleted here.
	var deletable []*volume
	for _, v := range created {
		if v.staging == "" && v.target == "" && !v.ctrlPublished {
			deletable = append(deletable, v)
		}
	}
	bench.Each(ctx, r.rec, phase(bench.OpDeleteVolume, planned), deletable, r.deleteVolume)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func newUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func joinMap(m map[string]string) string {
	var kv []string
	for k, v := range m {
		kv = append(kv, k+"="+v)
	}
	sort.Strings(kv)
	return strings.Join(kv, ",")
}

// stagingPath and targetPath follow the kubelet's layout, so a driver sees
// the paths it sees in a cluster.
func (r *runner) stagingPath(v *volume) string {
	if r.cfg.Access == bench.AccessBlock {
		return filepath.Join(r.kubelet, "plugins/kubernetes.io/csi/volumeDevices/staging", v.name)
	}
	sum := sha256.Sum256([]byte(v.id))
	return filepath.Join(r.kubelet, "plugins/kubernetes.io/csi", r.d.name, hex.EncodeToString(sum[:]), "globalmount")
}

func (r *runner) targetPath(v *volume) string {
	if r.cfg.Access == bench.AccessBlock {
		return filepath.Join(r.kubelet, "plugins/kubernetes.io/csi/volumeDevices/publish", v.name, r.podUID)
	}
	return filepath.Join(r.kubelet, "pods", r.podUID, "volumes/kubernetes.io~csi", v.name, "mount")
}
