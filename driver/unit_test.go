package driver

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cowcsi/cowcsi/cow"
)

func TestVolumeSize(t *testing.T) {
	const def = 1 << 30
	tests := []struct {
		name            string
		required, limit int64
		source          int64
		want            int64
		code            codes.Code
	}{
		{"unset: default", 0, 0, 0, def, codes.OK},
		{"round up to MiB", 1, 0, 0, mib, codes.OK},
		{"exact MiB", 64 * mib, 0, 0, 64 * mib, codes.OK},
		{"limit forces 4 KiB rounding", mib + 1, mib + 4096, 0, mib + 4096, codes.OK},
		{"limit only, below default", 0, 10 * mib, 0, 10 * mib, codes.OK},
		{"source larger than required", mib, 0, 8 * mib, 8 * mib, codes.OK},
		{"source larger than limit", 0, 4 * mib, 8 * mib, 0, codes.OutOfRange},
		{"limit below required", 2 * mib, mib, 0, 0, codes.OutOfRange},
		{"no 4 KiB multiple in range", 100, 200, 0, 0, codes.OutOfRange},
		{"negative", -1, 0, 0, 0, codes.InvalidArgument},
		{"huge", 1 << 62, 0, 0, 0, codes.OutOfRange},
		{"max int64", 1<<63 - 1, 0, 0, 0, codes.OutOfRange},
		{"just below max rounds to max", maxVolumeSize - 1, 0, 0, maxVolumeSize, codes.OK},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := volumeSize(&csi.CapacityRange{RequiredBytes: tc.required, LimitBytes: tc.limit}, tc.source, def)
			if status.Code(err) != tc.code || got != tc.want {
				t.Errorf("volumeSize = %d, %v; want %d, %v", got, err, tc.want, tc.code)
			}
		})
	}
}

func TestToStatus(t *testing.T) {
	tests := []struct {
		call rpc
		err  error
		want codes.Code
	}{
		{rpcCreateVolume, fmt.Errorf("x: %w", cow.ErrNotFound), codes.NotFound},
		{rpcCreateVolume, cow.ErrExists, codes.AlreadyExists},
		{rpcCreateVolume, cow.ErrInvalid, codes.OutOfRange},
		{rpcNodeExpand, cow.ErrInvalid, codes.OutOfRange},
		{rpcCreateSnapshot, cow.ErrInvalid, codes.InvalidArgument},
		{rpcCreateSnapshot, cow.ErrNoSpace, codes.ResourceExhausted},
		{rpcDeleteVolume, cow.ErrInUse, codes.FailedPrecondition},
		{rpcNodeUnstage, errExportBusy, codes.FailedPrecondition},
		{rpcListVolumes, cow.ErrClosed, codes.Unavailable},
		{rpcNodeStage, cow.ErrCorrupt, codes.DataLoss},
		{rpcNodeStage, errors.New("mount failed"), codes.Internal},
		{rpcNodeStage, status.Error(codes.Aborted, "x"), codes.Aborted},
	}
	for _, tc := range tests {
		if got := status.Code(toStatus(tc.call, tc.err)); got != tc.want {
			t.Errorf("toStatus(%s, %v) = %v, want %v", tc.call, tc.err, got, tc.want)
		}
	}
	if toStatus(rpcNodeStage, nil) != nil {
		t.Error("toStatus(nil) != nil")
	}
}

func TestIDs(t *testing.T) {
	a, b := volumeIDFor("pvc-1"), volumeIDFor("pvc-2")
	if a == b || a != volumeIDFor("pvc-1") || len(a) != len(volumeIDPrefix)+32 || cow.ValidateID(a) != nil {
		t.Errorf("volume IDs %q %q", a, b)
	}
	if s := snapshotIDFor("pvc-1"); s == a || cow.ValidateID(s) != nil {
		t.Errorf("snapshot ID %q", s)
	}
	if parametersDigest(map[string]string{"a": "bc"}) == parametersDigest(map[string]string{"ab": "c"}) {
		t.Error("digest is ambiguous")
	}
	if parametersDigest(nil) != parametersDigest(map[string]string{}) {
		t.Error("nil and empty parameters differ")
	}
}

func TestPage(t *testing.T) {
	ids := []string{"a", "b", "c", "d", "e"}
	var seen []string
	token := ""
	for range 10 {
		start, end, next, err := page(ids, token, 2)
		if err != nil {
			t.Fatal(err)
		}
		seen = append(seen, ids[start:end]...)
		if next == "" {
			break
		}
		token = next
	}
	if strings.Join(seen, "") != "abcde" {
		t.Errorf("pages: %v", seen)
	}
	// A token stays valid when its entry is deleted meanwhile.
	if start, _, _, err := page([]string{"a", "d"}, listTokenPrefix+"c", 0); err != nil || start != 1 {
		t.Errorf("token of a deleted entry: start %d err %v", start, err)
	}
	for _, bad := range []string{"x", listTokenPrefix, listTokenPrefix + "../a", "3"} {
		if _, _, _, err := page(ids, bad, 0); status.Code(err) != codes.Aborted {
			t.Errorf("token %q: %v, want Aborted", bad, err)
		}
	}
}

func TestInFlight(t *testing.T) {
	f := newInFlight()
	unlock, ok := f.tryLock("a", "b")
	if !ok {
		t.Fatal("first lock failed")
	}
	if _, ok := f.tryLock("b", "c"); ok {
		t.Fatal("overlapping lock succeeded")
	}
	if u, ok := f.tryLock("c", "", "c"); !ok {
		t.Fatal("disjoint lock failed")
	} else {
		u()
	}
	unlock()
	if u, ok := f.tryLock("b"); !ok {
		t.Fatal("lock after unlock failed")
	} else {
		u()
	}
}

func TestStateFile(t *testing.T) {
	dir := t.TempDir()
	s := stateFile{dir: dir}
	vols, err := s.load()
	if err != nil || len(vols) != 0 {
		t.Fatalf("empty load: %v %v", vols, err)
	}
	id := volumeIDFor("x")
	vols[id] = &stagedVolume{VolumeID: id, StagingPath: "/s", AccessType: accessMount, FSType: "ext4", LoopDevice: "/dev/loop9",
		Targets: map[string]publishedTarget{"/t": {ReadOnly: true}}}
	if err := s.save(vols); err != nil {
		t.Fatal(err)
	}
	got, err := s.load()
	if err != nil || got[id] == nil || !got[id].Targets["/t"].ReadOnly || got[id].LoopDevice != "/dev/loop9" {
		t.Fatalf("round trip: %+v %v", got[id], err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("temporary files left: %v", entries)
	}
	// A torn or foreign file is moved aside, not trusted.
	os.WriteFile(s.path(), []byte(`{"version":1,"volumes":[{"volumeID":"../x"`), 0o600)
	got, err = s.load()
	if err != nil || len(got) != 0 {
		t.Fatalf("corrupt load: %v %v", got, err)
	}
	if m, _ := filepath.Glob(s.path() + ".bad-*"); len(m) != 1 {
		t.Errorf("corrupt state not kept aside: %v", m)
	}
}

func TestOptions(t *testing.T) {
	o := DefaultOptions()
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	o.AddFlags(fs)
	if err := fs.Parse([]string{"--nodeid=n1", "--endpoint=unix:///run/csi/csi.sock", "--store-dir=/var/lib/x"}); err != nil {
		t.Fatal(err)
	}
	if err := o.Validate(); err != nil {
		t.Fatalf("valid options: %v", err)
	}
	if p, _ := socketPath(o.Endpoint); p != "/run/csi/csi.sock" {
		t.Errorf("socket path %q", p)
	}
	for _, bad := range []func(*Options){
		func(o *Options) { o.NodeID = "" },
		func(o *Options) { o.Endpoint = "tcp://127.0.0.1:10000" },
		func(o *Options) { o.Endpoint = "unix://relative/sock" },
		func(o *Options) { o.StoreDir = "relative" },
		func(o *Options) { o.FuseDir = "relative" },
		func(o *Options) { o.DriverName = "" },
		func(o *Options) { o.DefaultVolumeSize = 0 },
		func(o *Options) { o.FreezeTimeout = 0 },
		func(o *Options) { o.MaxVolumesPerNode = -1 },
		func(o *Options) { o.FuseIOURing = "yes" },
	} {
		o2 := o
		bad(&o2)
		if o2.Validate() == nil {
			t.Errorf("invalid options accepted: %+v", o2)
		}
	}
}

// blockingController blocks CreateSnapshot until released.
type blockingController struct {
	csi.UnimplementedControllerServer
	entered, release chan struct{}
}

func (b *blockingController) CreateSnapshot(ctx context.Context, req *csi.CreateSnapshotRequest) (*csi.CreateSnapshotResponse, error) {
	b.entered <- struct{}{}
	<-b.release
	return &csi.CreateSnapshotResponse{}, nil
}

func (b *blockingController) ListSnapshots(ctx context.Context, req *csi.ListSnapshotsRequest) (*csi.ListSnapshotsResponse, error) {
	return &csi.ListSnapshotsResponse{}, nil
}

func (b *blockingController) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	return &csi.DeleteVolumeResponse{}, nil
}

// TestLockedController: a concurrent call on the same snapshot name or
// the same source volume gets Aborted; read-only calls and other IDs pass.
func TestLockedController(t *testing.T) {
	inner := &blockingController{entered: make(chan struct{}), release: make(chan struct{})}
	l := &lockedController{ControllerServer: inner, f: newInFlight()}
	ctx := context.Background()
	first := make(chan error, 1)
	go func() {
		_, err := l.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: "vol-a"})
		first <- err
	}()
	<-inner.entered
	if _, err := l.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "s", SourceVolumeId: "vol-a"}); status.Code(err) != codes.Aborted {
		t.Errorf("duplicate CreateSnapshot: %v, want Aborted", err)
	}
	if _, err := l.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "other", SourceVolumeId: "vol-a"}); status.Code(err) != codes.Aborted {
		t.Errorf("second snapshot of the same volume: %v, want Aborted", err)
	}
	if _, err := l.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: "vol-a"}); status.Code(err) != codes.Aborted {
		t.Errorf("DeleteVolume of the volume being snapshotted: %v, want Aborted", err)
	}
	if _, err := l.ListSnapshots(ctx, &csi.ListSnapshotsRequest{}); err != nil {
		t.Errorf("ListSnapshots during CreateSnapshot: %v", err)
	}
	if _, err := l.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: "vol-b"}); err != nil {
		t.Errorf("DeleteVolume of another volume: %v", err)
	}
	close(inner.release)
	if err := <-first; err != nil {
		t.Errorf("first CreateSnapshot: %v", err)
	}
	if _, err := l.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: "vol-a"}); err != nil {
		t.Errorf("DeleteVolume after the snapshot: %v", err)
	}
}
