package driver

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"

	"k8s.io/klog/v2"
)

const (
	accessMount = "mount"
	accessBlock = "block"

	stateVersion = 1
)

// stagedVolume is what the node knows about a volume it has staged; it is
// persisted so that a restarted driver can rebuild the kernel side.
type stagedVolume struct {
	VolumeID    string `json:"volumeID"`
	StagingPath string `json:"stagingPath"`
	// AccessType is accessMount or accessBlock.
	AccessType string   `json:"accessType"`
	FSType     string   `json:"fsType,omitempty"`
	MountFlags []string `json:"mountFlags,omitempty"`
	// AccessMode is the csi.VolumeCapability_AccessMode_Mode it was staged with.
	AccessMode int32 `json:"accessMode"`
	// ReadOnly: staged for a reader-only access mode.
	ReadOnly bool `json:"readOnly,omitempty"`
	// LoopDevice is the /dev/loopN attached to the volume's FUSE file.
	LoopDevice string `json:"loopDevice"`
	// Targets are the NodePublishVolume target paths.
	Targets map[string]publishedTarget `json:"targets,omitempty"`
}

type publishedTarget struct {
	ReadOnly bool `json:"readOnly,omitempty"`
}

type stateDoc struct {
	Version int             `json:"version"`
	Volumes []*stagedVolume `json:"volumes"`
}

// stateFile persists the node state. Every change rewrites the whole
// (small) file: temp file, write, fsync, rename over the old one, fsync the
// directory. A reader sees the old or the new state, never a torn one.
type stateFile struct {
	dir string
}

func (s stateFile) path() string { return filepath.Join(s.dir, "state") }

func (s stateFile) load() (map[string]*stagedVolume, error) {
	out := map[string]*stagedVolume{}
	b, err := os.ReadFile(s.path())
	if errors.Is(err, fs.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return nil, err
	}
	var doc stateDoc
	if err := json.Unmarshal(b, &doc); err != nil || doc.Version != stateVersion {
		// Keep the unreadable file for a human and start empty: refusing
		// to start would leave every volume of this node unusable.
		aside := fmt.Sprintf("%s.bad-%d", s.path(), time.Now().Unix())
		if rerr := os.Rename(s.path(), aside); rerr != nil {
			return nil, fmt.Errorf("node state %s unreadable (%v) and cannot be moved aside: %w", s.path(), err, rerr)
		}
		klog.ErrorS(err, "Node state unreadable; moved aside, starting with no staged volumes", "path", aside, "version", doc.Version)
		return out, nil
	}
	for _, v := range doc.Volumes {
		if v == nil || checkID("volume ID", v.VolumeID) != nil {
			klog.InfoS("Ignoring malformed node state entry", "entry", v)
			continue
		}
		if v.Targets == nil {
			v.Targets = map[string]publishedTarget{}
		}
		out[v.VolumeID] = v
	}
	return out, nil
}

func (s stateFile) save(vols map[string]*stagedVolume) error {
	doc := stateDoc{Version: stateVersion, Volumes: make([]*stagedVolume, 0, len(vols))}
	for _, v := range vols {
		doc.Volumes = append(doc.Volumes, v)
	}
	sort.Slice(doc.Volumes, func(i, j int) bool { return doc.Volumes[i].VolumeID < doc.Volumes[j].VolumeID })
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(s.path(), b)
}

// writeFileAtomic replaces path with data so that after a crash at any
// point path holds either the old or the new content.
func writeFileAtomic(path string, data []byte) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err = tmp.Write(data); err != nil {
		return err
	}
	if err = tmp.Sync(); err != nil {
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	return syncDir(dir)
}

// freezeRecord is a filesystem freeze this driver may hold. It is written
// (durably) before the freeze child starts and removed once the child has
// exited having thawed; one left behind by a crash is thawed at the next
// start (nodeService.thawRecorded).
type freezeRecord struct {
	VolumeID string `json:"volumeID"`
	// Dev is the loop device's number; only a filesystem on it is thawed.
	Dev uint64 `json:"dev"`
	// Paths reach the filesystem: the staging path, then the targets
	// (bind mounts of it).
	Paths []string `json:"paths"`
}

func (s stateFile) freezeDir() string { return filepath.Join(s.dir, "freezing") }

func (s stateFile) putFreeze(r freezeRecord) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if _, err := os.Stat(s.freezeDir()); errors.Is(err, fs.ErrNotExist) {
		// A new directory is durable once its parent is synced.
		if err := os.MkdirAll(s.freezeDir(), 0o700); err != nil {
			return err
		}
		if err := syncDir(s.dir); err != nil {
			return err
		}
	}
	return writeFileAtomic(filepath.Join(s.freezeDir(), r.VolumeID), b)
}

// clearFreeze removes a freeze record. Not synced: a record that comes
// back after a power cut only causes a needless thaw at start.
func (s stateFile) clearFreeze(volumeID string) error {
	err := os.Remove(filepath.Join(s.freezeDir(), volumeID))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	return err
}

func (s stateFile) loadFreezes() ([]freezeRecord, error) {
	entries, err := os.ReadDir(s.freezeDir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []freezeRecord
	var errs []error
	for _, e := range entries {
		if checkID("volume ID", e.Name()) != nil {
			continue // a temporary file of writeFileAtomic
		}
		b, err := os.ReadFile(filepath.Join(s.freezeDir(), e.Name()))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var r freezeRecord
		if err := json.Unmarshal(b, &r); err != nil {
			errs = append(errs, fmt.Errorf("freeze record %s: %w", e.Name(), err))
			continue
		}
		out = append(out, r)
	}
	return out, errors.Join(errs...)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
