package cow

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/cowcsi/cowcsi/cow/internal/faultfs"
	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
)

const (
	catalogName = "catalog.log"
	// catalogGrow is the zero-filled space kept ahead of the log's end so a
	// commit overwrites existing blocks: one fdatasync, no inode update.
	catalogGrow = 1 << 20
	// compactAfter: rewrite the log as one checkpoint once it is this much
	// larger than the last checkpoint (and at least compactMin).
	compactAfter = 4
	compactMin   = 4 << 20
)

// catalog is the store's metadata: volumes, snapshots and layers. Every change
// is one frame appended to the log and fdatasynced before it is applied in
// memory, so memory never runs ahead of disk.
type catalog struct {
	dir      string
	volumes  map[string]*ondisk.VolumeRec
	snaps    map[string]*ondisk.SnapshotRec
	layers   map[uint32]*ondisk.LayerRec
	maxLayer uint32

	ff         *faultfs.FS // file I/O (nil: plain)
	log        *os.File
	off, alloc int64
	// broken is set when the log may hold a commit that was reported as
	// failed, or may not be the file the directory names: no commit is
	// taken until the store is reopened.
	broken     bool
	checkpoint int64 // size of the last checkpoint frame
}

func newCatalogMaps(c *catalog) {
	c.volumes = map[string]*ondisk.VolumeRec{}
	c.snaps = map[string]*ondisk.SnapshotRec{}
	c.layers = map[uint32]*ondisk.LayerRec{}
	c.maxLayer = 0
}

func openCatalog(dir string, ff *faultfs.FS) (*catalog, error) {
	c := &catalog{dir: dir, ff: ff}
	newCatalogMaps(c)
	path := filepath.Join(dir, catalogName)
	img, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		if err := c.rewrite(); err != nil {
			return nil, err
		}
		return c, nil
	}
	if err != nil {
		return nil, ioErr(err)
	}
	off := 0
	for off < len(img) {
		kind, ops, n, err := ondisk.DecodeFrame(img[off:])
		if errors.Is(err, ondisk.ErrEnd) {
			break
		}
		if errors.Is(err, ondisk.ErrVersion) {
			return nil, errf(ErrCorrupt, "catalog: %v", err)
		}
		if err != nil {
			// A torn last frame: the commit it held never returned.
			if validFrameAfter(img, off) {
				return nil, errf(ErrCorrupt, "catalog: damaged frame at %d before valid frames", off)
			}
			break
		}
		if kind == ondisk.FrameCheckpoint {
			newCatalogMaps(c)
			c.checkpoint = int64(n)
		}
		c.apply(ops)
		off += n
	}
	if c.log, err = openFile(ff, path, os.O_RDWR, 0); err != nil {
		return nil, ioErr(err)
	}
	c.off, c.alloc = int64(off), int64(len(img))
	// Zero whatever a torn frame left, so nothing after the end can ever be
	// mistaken for a frame.
	if err := zeroLogTail(ff, c.log, img, int64(off)); err != nil {
		return nil, err
	}
	return c, nil
}

// validFrameAfter reports whether any valid frame starts after off: damage
// followed by a valid frame is not a torn tail.
func validFrameAfter(img []byte, off int) bool {
	for i := off + 1; i+16 <= len(img); i++ {
		if _, _, _, err := ondisk.DecodeFrame(img[i:]); err == nil {
			return true
		}
	}
	return false
}

func allZeroBytes(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func (c *catalog) apply(ops []ondisk.Op) {
	for _, op := range ops {
		switch op.Kind {
		case ondisk.OpPutVolume:
			v := *op.Volume
			c.volumes[v.ID] = &v
		case ondisk.OpDelVolume:
			delete(c.volumes, op.ID)
		case ondisk.OpPutSnapshot:
			s := *op.Snapshot
			c.snaps[s.ID] = &s
		case ondisk.OpDelSnapshot:
			delete(c.snaps, op.ID)
		case ondisk.OpPutLayer:
			l := *op.Layer
			c.layers[l.Num] = &l
			if l.Num > c.maxLayer {
				c.maxLayer = l.Num
			}
		case ondisk.OpDelLayer:
			delete(c.layers, op.Num)
		}
	}
}

// commit makes ops durable, then applies them. On error nothing is applied.
func (c *catalog) commit(ops []ondisk.Op) error {
	if c.broken {
		return fmt.Errorf("%w: catalog: an earlier write failed: no commit until the store is reopened", syscall.EIO)
	}
	frame := ondisk.EncodeFrame(ondisk.FrameTxn, ops)
	if err := appendLog(c.ff, c.log, frame, c.off, &c.alloc, catalogGrow); err != nil {
		return err
	}
	if err := c.ff.Fdatasync(c.log); err != nil {
		// The frame may or may not be on disk (Linux marks the pages clean
		// after a writeback error). Overwrite it with zeros, durably, so a
		// later reopen cannot see a commit this call reported as failed;
		// if that fails too, take no more commits.
		if _, zerr := c.ff.WriteAt(c.log, make([]byte, len(frame)), c.off); zerr != nil || c.ff.Fdatasync(c.log) != nil {
			c.broken = true
		}
		return ioErr(err)
	}
	c.off += int64(len(frame))
	c.apply(ops)
	if c.off > compactMin && c.off > compactAfter*c.checkpoint {
		// Best effort: the log stays valid if compaction fails.
		_ = c.rewrite()
	}
	return nil
}

// snapshotOps describes the whole catalog as ops.
func (c *catalog) snapshotOps() []ondisk.Op {
	var ops []ondisk.Op
	for _, l := range c.layers {
		ops = append(ops, ondisk.Op{Kind: ondisk.OpPutLayer, Layer: l})
	}
	for _, v := range c.volumes {
		ops = append(ops, ondisk.Op{Kind: ondisk.OpPutVolume, Volume: v})
	}
	for _, s := range c.snaps {
		ops = append(ops, ondisk.Op{Kind: ondisk.OpPutSnapshot, Snapshot: s})
	}
	return ops
}

// rewrite replaces the log with a single checkpoint: write a new file, sync
// it, rename it over the old one, sync the directory.
func (c *catalog) rewrite() error {
	frame := ondisk.EncodeFrame(ondisk.FrameCheckpoint, c.snapshotOps())
	path := filepath.Join(c.dir, catalogName)
	tmp := path + ".tmp"
	f, err := openFile(c.ff, tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return ioErr(err)
	}
	alloc := (int64(len(frame))/catalogGrow + 1) * catalogGrow
	img := make([]byte, alloc)
	copy(img, frame)
	if _, err := c.ff.WriteAt(f, img, 0); err != nil {
		f.Close()
		c.ff.Remove(tmp)
		return ioErr(err)
	}
	if err := c.ff.Fsync(f); err != nil {
		f.Close()
		c.ff.Remove(tmp)
		return ioErr(err)
	}
	if err := c.ff.Rename(tmp, path); err != nil {
		f.Close()
		return ioErr(err)
	}
	// The new file is the log now, whether the rename is durable or not:
	// commits to the old one would go to a file no directory names.
	if c.log != nil {
		c.log.Close()
	}
	c.log, c.off, c.alloc, c.checkpoint = f, int64(len(frame)), alloc, int64(len(frame))
	if err := syncDir(c.ff, c.dir); err != nil {
		// After a power cut the directory may name the old log, which
		// lacks any later commit.
		c.broken = true
		return err
	}
	return nil
}

func (c *catalog) close() error {
	if c.log == nil {
		return nil
	}
	err := c.log.Close()
	c.log = nil
	return err
}

func (c *catalog) String() string {
	return fmt.Sprintf("catalog{volumes:%d snapshots:%d layers:%d}", len(c.volumes), len(c.snaps), len(c.layers))
}
