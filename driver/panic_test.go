package driver

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cowcsi/cowcsi/cow"
	"github.com/cowcsi/cowcsi/test/testutil"
)

// panicEngine panics in CreateSnapshot while armed: a bug in a handler
// between the freeze and the thaw.
type panicEngine struct {
	Engine
	armed *atomic.Bool
}

func (e panicEngine) CreateSnapshot(ctx context.Context, spec cow.SnapshotSpec) (cow.SnapshotInfo, error) {
	if e.armed.Load() {
		panic("test: engine bug during CreateSnapshot")
	}
	return e.Engine.CreateSnapshot(ctx, spec)
}

// TestPanicInSnapshotThaws: a panic while the source's filesystem is frozen
// answers Internal, leaves the filesystem thawed and the driver serving.
func TestPanicInSnapshotThaws(t *testing.T) {
	testutil.RequireRoot(t, nodeNeeds...)
	env := newTestEnv(t)
	armed := new(atomic.Bool)
	deps := DefaultDeps()
	open := deps.OpenEngine
	deps.OpenEngine = func(dir string) (Engine, error) {
		e, err := open(dir)
		if err != nil {
			return nil, err
		}
		return panicEngine{Engine: e, armed: armed}, nil
	}
	td := startDriverWith(t, testOptions(env), deps)
	vol := createVolume(t, td, &csi.CreateVolumeRequest{Name: "panic-src"})
	pv := stageAndPublish(t, td, env, vol.GetVolumeId(), mountCap(rwo, "ext4"))

	armed.Store(true)
	_, err := td.ctrl.CreateSnapshot(context.Background(), &csi.CreateSnapshotRequest{Name: "panic-snap", SourceVolumeId: pv.id})
	if status.Code(err) != codes.Internal {
		t.Fatalf("CreateSnapshot with a panicking engine: %v, want Internal", err)
	}
	if isFrozen(t, pv.staging) {
		t.Fatal("the staging filesystem is still frozen after the panic")
	}
	armed.Store(false)
	snapshot(t, td, "panic-snap", pv.id, nil)
}
