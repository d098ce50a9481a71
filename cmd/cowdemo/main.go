// Command cowdemo walks the story cowcsi starts from, on this machine, with no
// cluster: it starts the cowcsi binary on a temporary store and drives it
// through the CSI API exactly as the sidecars and kubelet would — create a
// volume, stage and publish it (real loop device, FUSE file, mkfs, mount),
// write a file without sync, snapshot, restore into a new volume, read the
// file back — and prints every step with how long it took. Then it does the
// same with the filesystem freeze turned off, to show the page-cache trap a
// plain block-level snapshot falls into. Everything it made is removed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func main() {
	cowcsi := flag.String("cowcsi", "", "path of the cowcsi binary (default: next to cowdemo, then $PATH)")
	fsType := flag.String("fs", "ext4", "filesystem for the volumes: ext4 or xfs")
	size := flag.Int64("size", 1<<30, "volume size in bytes")
	keep := flag.Bool("keep", false, "keep the temporary directory (store, logs) for inspection")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *cowcsi, *fsType, *size, *keep); err != nil {
		fmt.Fprintf(os.Stderr, "\ncowdemo: FAILED: %v\n", err)
		os.Exit(1)
	}
}

type demo struct {
	dir  string
	id   *csi.NodeGetInfoResponse
	ctrl csi.ControllerClient
	node csi.NodeClient
	cap  *csi.VolumeCapability
	size int64
	// undo holds cleanup steps, run last-in first-out on every path.
	undo []func(context.Context) error
}

func step(name string, fn func() (string, error)) error {
	start := time.Now()
	detail, err := fn()
	d := time.Since(start)
	if err != nil {
		fmt.Printf("  %-52s %10s  FAILED: %v\n", name, d.Round(time.Microsecond), err)
		return fmt.Errorf("%s: %w", name, err)
	}
	fmt.Printf("  %-52s %10s  %s\n", name, d.Round(time.Microsecond), detail)
	return nil
}

func findCowcsi(flagPath string) (string, error) {
	if flagPath != "" {
		return flagPath, nil
	}
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "cowcsi")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return exec.LookPath("cowcsi")
}

func run(ctx context.Context, cowcsiPath, fsType string, size int64, keep bool) (err error) {
	if os.Geteuid() != 0 {
		return errors.New("cowdemo needs root: it attaches loop devices, serves FUSE and mounts filesystems")
	}
	bin, err := findCowcsi(cowcsiPath)
	if err != nil {
		return fmt.Errorf("cowcsi binary not found (build it with `make build`): %w", err)
	}
	dir, err := os.MkdirTemp("/var/tmp", "cowdemo-")
	if err != nil {
		return err
	}
	d := &demo{dir: dir, size: size, cap: &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fsType}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
	}}
	fmt.Printf("cowdemo: the VolumeSnapshot story through cowcsi's CSI API (%s, %d MiB volumes)\n", fsType, size>>20)
	fmt.Printf("  work directory %s\n\n", dir)
	defer func() {
		if cerr := d.cleanup(keep); cerr != nil {
			err = errors.Join(err, cerr)
		}
	}()
	if err := d.startDriver(ctx, bin); err != nil {
		return err
	}
	return d.stories(ctx)
}

// cleanup runs the undo steps, last first, and removes the work directory
// unless keep. It has a context of its own: the run's may be cancelled
// (Ctrl-C) and cleanup must still run.
func (d *demo) cleanup(keep bool) (err error) {
	cctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	fmt.Println("\nclean up")
	for i := len(d.undo) - 1; i >= 0; i-- {
		if uerr := d.undo[i](cctx); uerr != nil {
			err = errors.Join(err, uerr)
		}
	}
	if keep {
		fmt.Printf("  kept %s\n", d.dir)
	} else if rerr := os.RemoveAll(d.dir); rerr != nil {
		err = errors.Join(err, rerr)
	}
	return err
}

// startDriver starts cowcsi on a store in the work directory, logging to
// cowcsi.log there, and connects to it once it is ready. Stopping it is an
// undo step.
func (d *demo) startDriver(ctx context.Context, bin string) error {
	sock := filepath.Join(d.dir, "csi.sock")
	logf, err := os.Create(filepath.Join(d.dir, "cowcsi.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(bin, "--endpoint=unix://"+sock, "--nodeid=demo-node",
		"--store-dir="+filepath.Join(d.dir, "store"), "--v=2")
	cmd.Stdout, cmd.Stderr = logf, logf
	fmt.Println("start the driver")
	if err := step("cowcsi --nodeid=demo-node (until Probe ready)", func() (string, error) {
		if err := cmd.Start(); err != nil {
			return "", err
		}
		d.undo = append(d.undo, func(context.Context) error {
			return step("stop cowcsi (SIGTERM)", func() (string, error) {
				_ = cmd.Process.Signal(syscall.SIGTERM)
				done := make(chan error, 1)
				go func() { done <- cmd.Wait() }()
				select {
				case err := <-done:
					return "stopped", err
				case <-time.After(30 * time.Second):
					_ = cmd.Process.Kill()
					return "", errors.New("did not stop within 30s; killed")
				}
			})
		})
		return d.connect(ctx, sock)
	}); err != nil {
		return fmt.Errorf("%w (driver log: %s)", err, logf.Name())
	}
	return nil
}

// stories tells the story twice: with cowcsi's freeze, where the restored
// file must be whole, and without it, where it may not be.
func (d *demo) stories(ctx context.Context) error {
	fmt.Println("\n1. with cowcsi's freeze (the default): the file written without sync is in the snapshot")
	content := []byte("data-goc-truoc-snapshot\n")
	got, err := d.story(ctx, "1", content, nil)
	if err != nil {
		return err
	}
	if string(got) != string(content) {
		return fmt.Errorf("restored important.txt holds %q, want %q", got, content)
	}
	fmt.Printf("  => restored important.txt: %d bytes, %q: whole\n", len(got), got)

	fmt.Println("\n2. with the freeze off (cowcsi.io/freeze: \"false\"): a plain block-level snapshot")
	got, err = d.story(ctx, "2", content, map[string]string{"cowcsi.io/freeze": "false"})
	if err != nil {
		return err
	}
	switch {
	case got == nil:
		fmt.Println("  => restored volume has no important.txt: its directory entry was still in the page cache")
	case string(got) == string(content):
		fmt.Println("  => restored important.txt is whole this time: the kernel had written it back already (not guaranteed)")
	default:
		fmt.Printf("  => restored important.txt: %d bytes (%q): the data was still in the page cache, as in the article\n", len(got), got)
	}
	return nil
}

func (d *demo) connect(ctx context.Context, sock string) (string, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return "", errors.New("socket did not appear within 30s")
		}
		time.Sleep(20 * time.Millisecond) // polling for a file another process creates
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	d.undo = append(d.undo, func(context.Context) error { return conn.Close() })
	id := csi.NewIdentityClient(conn)
	for {
		r, err := id.Probe(ctx, &csi.ProbeRequest{})
		if err == nil && r.GetReady().GetValue() {
			break
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("not ready within 30s: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	info, err := id.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil {
		return "", err
	}
	d.ctrl, d.node = csi.NewControllerClient(conn), csi.NewNodeClient(conn)
	if d.id, err = d.node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{}); err != nil {
		return "", err
	}
	return fmt.Sprintf("%s %s ready, node %s", info.GetName(), info.GetVendorVersion(), d.id.GetNodeId()), nil
}

// story: create src, publish, write without sync, snapshot, restore, publish,
// read. It returns the restored file's content (nil if it does not exist).
func (d *demo) story(ctx context.Context, tag string, content []byte, snapParams map[string]string) ([]byte, error) {
	src, err := d.createVolume(ctx, "src-pvc-"+tag, nil)
	if err != nil {
		return nil, err
	}
	srcDir, err := d.publish(ctx, src)
	if err != nil {
		return nil, err
	}
	file := filepath.Join(srcDir, "important.txt")
	if err := step("write important.txt, no sync", func() (string, error) {
		// os.WriteFile writes and closes; it does not fsync: the data sits
		// in the page cache, as after `echo > file` in the article.
		return fmt.Sprintf("%d bytes in the page cache", len(content)), os.WriteFile(file, content, 0o644)
	}); err != nil {
		return nil, err
	}
	var snap *csi.Snapshot
	if err := step("CreateSnapshot snap"+tag, func() (string, error) {
		r, err := d.ctrl.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{SourceVolumeId: src, Name: "snap" + tag, Parameters: snapParams})
		if err != nil {
			return "", err
		}
		snap = r.GetSnapshot()
		return fmt.Sprintf("readyToUse=%v id=%s", snap.GetReadyToUse(), snap.GetSnapshotId()), nil
	}); err != nil {
		return nil, err
	}
	d.undo = append(d.undo, func(ctx context.Context) error {
		return step("DeleteSnapshot snap"+tag, func() (string, error) {
			_, err := d.ctrl.DeleteSnapshot(ctx, &csi.DeleteSnapshotRequest{SnapshotId: snap.GetSnapshotId()})
			return "", err
		})
	})
	restored, err := d.createVolume(ctx, "restore-pvc-"+tag, &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
		Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: snap.GetSnapshotId()}}})
	if err != nil {
		return nil, err
	}
	dstDir, err := d.publish(ctx, restored)
	if err != nil {
		return nil, err
	}
	var got []byte
	err = step("read important.txt from the restored volume", func() (string, error) {
		b, err := os.ReadFile(filepath.Join(dstDir, "important.txt"))
		if errors.Is(err, os.ErrNotExist) {
			return "no such file", nil
		}
		got = b
		if b == nil {
			got = []byte{}
		}
		return fmt.Sprintf("%d bytes", len(b)), err
	})
	return got, err
}

func (d *demo) createVolume(ctx context.Context, name string, src *csi.VolumeContentSource) (string, error) {
	var id string
	label := "CreateVolume " + name
	if src != nil {
		label += " from snapshot"
	}
	err := step(label, func() (string, error) {
		r, err := d.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name,
			CapacityRange:      &csi.CapacityRange{RequiredBytes: d.size},
			VolumeCapabilities: []*csi.VolumeCapability{d.cap}, VolumeContentSource: src})
		if err != nil {
			return "", err
		}
		id = r.GetVolume().GetVolumeId()
		return fmt.Sprintf("%s, %d MiB", id, r.GetVolume().GetCapacityBytes()>>20), nil
	})
	if err == nil {
		d.undo = append(d.undo, func(ctx context.Context) error {
			return step("DeleteVolume "+name, func() (string, error) {
				_, err := d.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: id})
				return "", err
			})
		})
	}
	return id, err
}

// publish stages and publishes a volume with kubelet's path layout and
// returns the mount the pod would see.
func (d *demo) publish(ctx context.Context, id string) (string, error) {
	staging := filepath.Join(d.dir, "kubelet/plugins/kubernetes.io/csi/cowcsi.io", id, "globalmount")
	target := filepath.Join(d.dir, "kubelet/pods/demo-pod", id, "mount")
	if err := os.MkdirAll(staging, 0o750); err != nil {
		return "", err
	}
	if err := step("NodeStageVolume (FUSE file, loop, mkfs, mount)", func() (string, error) {
		_, err := d.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: id, StagingTargetPath: staging, VolumeCapability: d.cap})
		return staging, err
	}); err != nil {
		return "", err
	}
	d.undo = append(d.undo, func(ctx context.Context) error {
		return step("NodeUnstageVolume "+id, func() (string, error) {
			_, err := d.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: staging})
			return "", err
		})
	})
	if err := step("NodePublishVolume (bind mount)", func() (string, error) {
		_, err := d.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: id, StagingTargetPath: staging,
			TargetPath: target, VolumeCapability: d.cap})
		return target, err
	}); err != nil {
		return "", err
	}
	d.undo = append(d.undo, func(ctx context.Context) error {
		return step("NodeUnpublishVolume "+id, func() (string, error) {
			_, err := d.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
			return "", err
		})
	})
	return target, nil
}
