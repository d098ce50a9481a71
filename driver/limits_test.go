package driver

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/cowcsi/cowcsi/test/testutil"
)

// setFDLimit makes the driver see soft RLIMIT_NOFILE limit until t ends.
func setFDLimit(t *testing.T, limit int) {
	old := fdLimit
	fdLimit = func() (int, error) { return limit, nil }
	t.Cleanup(func() { fdLimit = old })
}

func TestVolumeLimit(t *testing.T) {
	tests := []struct {
		name   string
		flag   int64
		nofile int
		want   int64
	}{
		{"flag wins", 5, 20000, 5},
		{"from the descriptor limit", 0, 20000, (20000 - fdReserve) / fdsPerVolume},
		{"tiny descriptor limit: still one", 0, 100, 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			setFDLimit(t, tc.nofile)
			o := Options{MaxVolumesPerNode: tc.flag}
			if got := o.volumeLimit(); got != tc.want {
				t.Errorf("volumeLimit() = %d, want %d", got, tc.want)
			}
		})
	}
}

// TestStageLimit: NodeGetInfo reports the node's volume limit, and
// NodeStageVolume past it, or with too few descriptors left, fails with
// RESOURCE_EXHAUSTED instead of failing somewhere inside the stage.
func TestStageLimit(t *testing.T) {
	testutil.RequireRoot(t, nodeNeeds...)
	env := newTestEnv(t)
	opts := testOptions(env)
	opts.MaxVolumesPerNode = 2
	td := startDriverWith(t, opts, DefaultDeps())
	ctx := context.Background()
	info, err := td.node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil || info.GetMaxVolumesPerNode() != 2 {
		t.Fatalf("NodeGetInfo: max_volumes_per_node %d, %v; want 2", info.GetMaxVolumesPerNode(), err)
	}
	vc := blockCap(rwo)
	stage := func(name string) error {
		id := volumeIDFor(name)
		_, err := td.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id,
			StagingTargetPath: filepath.Join(env.root, "staging-"+name), VolumeCapability: vc})
		return err
	}
	unstage := func(name string) {
		if _, err := td.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: volumeIDFor(name),
			StagingTargetPath: filepath.Join(env.root, "staging-"+name)}); err != nil {
			t.Errorf("NodeUnstageVolume %s: %v", name, err)
		}
	}
	for _, name := range []string{"a", "b", "c"} {
		createVolume(t, td, &csi.CreateVolumeRequest{Name: name, VolumeCapabilities: []*csi.VolumeCapability{vc}})
	}
	for _, name := range []string{"a", "b"} {
		if err := stage(name); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unstage(name) })
	}
	if err := stage("c"); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("NodeStageVolume past --max-volumes-per-node: %v, want ResourceExhausted", err)
	}
	// Staged again: idempotent, not a new volume.
	if err := stage("a"); err != nil {
		t.Errorf("NodeStageVolume of a staged volume at the limit: %v", err)
	}
	unstage("b")
	// Room for one more volume, but not for its descriptors.
	open, err := openFDs()
	if err != nil {
		t.Fatal(err)
	}
	setFDLimit(t, open+fdReserve)
	if err := stage("c"); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("NodeStageVolume with %d descriptors left: %v, want ResourceExhausted", fdReserve, err)
	}
	setFDLimit(t, 1<<20)
	if err := stage("c"); err != nil {
		t.Errorf("NodeStageVolume below the limits: %v", err)
	} else {
		unstage("c")
	}
}
