package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// startPluginArgs is startPlugin with extra flags, its stderr copied to
// the test's and to watch (if not nil) line by line.
func startPluginArgs(t *testing.T, sock, store string, watch *logWatch, extra ...string) *plugin {
	t.Helper()
	var stderr io.Writer = os.Stderr
	if watch != nil {
		pr, pw := io.Pipe()
		stderr = pw
		go watch.scan(pr)
		t.Cleanup(func() { pw.Close() })
	}
	// Recovering hundreds of volumes takes minutes.
	p, err := launchPluginWithin(5*time.Minute, os.Args[0], sock, store, stderr, extra...)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// logWatch copies a plugin's log to os.Stderr and closes a channel the
// first time a line contains a given string.
type logWatch struct {
	mu    sync.Mutex
	wants map[string]chan struct{}
}

func newLogWatch() *logWatch { return &logWatch{wants: map[string]chan struct{}{}} }

// seen returns a channel closed once a line containing s is logged.
func (w *logWatch) seen(s string) <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	if ch, ok := w.wants[s]; ok {
		return ch
	}
	ch := make(chan struct{})
	w.wants[s] = ch
	return ch
}

func (w *logWatch) scan(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		fmt.Fprintln(os.Stderr, line)
		w.mu.Lock()
		for s, ch := range w.wants {
			if strings.Contains(line, s) {
				select {
				case <-ch:
				default:
					close(ch)
				}
			}
		}
		w.mu.Unlock()
	}
	io.Copy(io.Discard, r)
}

// fleetVol is one volume of a fleet: created, staged and published, with
// data written and fsynced at its target.
type fleetVol struct {
	name, id        string
	block           bool
	staging, target string
	want            []byte
}

func (v *fleetVol) capability() *csi.VolumeCapability {
	vc := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER}}
	if v.block {
		vc.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
	} else {
		vc.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: "ext4"}}
	}
	return vc
}

// dataPath is where the volume's checked data lives: the block device
// itself, or a file in the filesystem.
func (v *fleetVol) dataPath() string {
	if v.block {
		return v.target
	}
	return filepath.Join(v.target, "data")
}

// newFleet names nBlock block and nFS ext4 volumes below root.
func newFleet(root string, nBlock, nFS int) []*fleetVol {
	var vols []*fleetVol
	for i := range nBlock + nFS {
		name := fmt.Sprintf("fleet-%03d", i)
		vols = append(vols, &fleetVol{name: name, block: i < nBlock,
			staging: filepath.Join(root, "staging", name), target: filepath.Join(root, "pods", name, "vol")})
	}
	return vols
}

// parallel runs f on every volume, workers at a time, and returns the
// first error.
func parallel(vols []*fleetVol, workers int, f func(v *fleetVol) error) error {
	ch := make(chan *fleetVol)
	errs := make(chan error, len(vols))
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for v := range ch {
				if err := f(v); err != nil {
					errs <- fmt.Errorf("%s: %w", v.name, err)
				}
			}
		})
	}
	for _, v := range vols {
		ch <- v
	}
	close(ch)
	wg.Wait()
	close(errs)
	return <-errs
}

// bringUp creates, stages and publishes v through p and writes its data.
func (v *fleetVol) bringUp(p *plugin, size int64) error {
	ctx := context.Background()
	vc := v.capability()
	resp, err := p.ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: v.name, VolumeCapabilities: []*csi.VolumeCapability{vc},
		CapacityRange: &csi.CapacityRange{RequiredBytes: size}})
	if err != nil {
		return err
	}
	v.id = resp.GetVolume().GetVolumeId()
	if err := os.MkdirAll(v.staging, 0o750); err != nil {
		return err
	}
	if _, err := p.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, VolumeCapability: vc}); err != nil {
		return err
	}
	if _, err := p.node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging, TargetPath: v.target, VolumeCapability: vc}); err != nil {
		return err
	}
	return v.write(fmt.Sprintf("<%s synced>", v.name))
}

// write replaces the volume's data with 256 KiB of tag, fsynced.
func (v *fleetVol) write(tag string) error {
	want := bytes.Repeat([]byte(tag), (256<<10)/len(tag)+1)[:256<<10]
	f, err := os.OpenFile(v.dataPath(), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(want, 0); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	v.want = want
	return f.Close()
}

// check reads the volume's data back.
func (v *fleetVol) check() error {
	f, err := os.Open(v.dataPath())
	if err != nil {
		return err
	}
	defer f.Close()
	got := make([]byte, len(v.want))
	if _, err := io.ReadFull(f, got); err != nil {
		return err
	}
	if !bytes.Equal(got, v.want) {
		return fmt.Errorf("data differs from what was fsynced")
	}
	return nil
}

// tearDown unpublishes, unstages and deletes v through p.
func (v *fleetVol) tearDown(p *plugin) error {
	if v.id == "" {
		return nil
	}
	ctx := context.Background()
	if _, err := p.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.id, TargetPath: v.target}); err != nil {
		return err
	}
	if _, err := p.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.id, StagingTargetPath: v.staging}); err != nil {
		return err
	}
	_, err := p.ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.id})
	return err
}
