package cow

import (
	"context"
	"time"

	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
)

// The store's volumes: creating (empty, restored or cloned), deleting,
// expanding and looking them up.

func volumeInfo(r *ondisk.VolumeRec) VolumeInfo {
	return VolumeInfo{ID: r.ID, Size: r.Size, SourceSnapshot: r.SourceSnapshot, SourceVolume: r.SourceVolume,
		Labels: copyLabels(r.Labels), CreatedAt: time.Unix(0, r.Created)}
}

// CreateVolume creates an empty volume, a restore of a snapshot or a clone of
// a volume. Restore and clone are O(1): the new volume's head layer sits on
// the snapshot's layer (or on the source's head, frozen for the purpose).
func (s *Store) CreateVolume(ctx context.Context, spec VolumeSpec) (VolumeInfo, error) {
	size, err := checkVolumeSpec(spec)
	if err != nil {
		return VolumeInfo{}, err
	}
	if err := ctx.Err(); err != nil {
		return VolumeInfo{}, err
	}
	s.topo.Lock()
	defer s.topo.Unlock()
	if err := s.checkOpen(); err != nil {
		return VolumeInfo{}, err
	}
	if _, ok := s.cat.volumes[spec.ID]; ok {
		return VolumeInfo{}, errf(ErrExists, "volume %s", spec.ID)
	}
	rec := &ondisk.VolumeRec{ID: spec.ID, Size: size, SourceSnapshot: spec.SourceSnapshot,
		SourceVolume: spec.SourceVolume, Labels: copyLabels(spec.Labels), Created: time.Now().UnixNano()}
	var src volumeSource
	switch {
	case spec.SourceSnapshot != "":
		sn, ok := s.cat.snaps[spec.SourceSnapshot]
		if !ok {
			return VolumeInfo{}, errf(ErrNotFound, "snapshot %s", spec.SourceSnapshot)
		}
		if size < sn.Size {
			return VolumeInfo{}, errf(ErrInvalid, "volume size %d is smaller than snapshot %s (%d)", size, sn.ID, sn.Size)
		}
		src.parent = s.byNum[sn.Layer]
	case spec.SourceVolume != "":
		srcVol := s.vols[spec.SourceVolume]
		if srcVol == nil {
			return VolumeInfo{}, errf(ErrNotFound, "volume %s", spec.SourceVolume)
		}
		if size < srcVol.size.Load() {
			return VolumeInfo{}, errf(ErrInvalid, "volume size %d is smaller than source volume %s (%d)", size, srcVol.id, srcVol.size.Load())
		}
		// Freeze the source's head; the source continues on a new head and
		// the clone starts its own head on the frozen one.
		srcVol.barrier.Lock()
		defer srcVol.barrier.Unlock()
		if src, err = s.freezeForClone(srcVol); err != nil {
			return VolumeInfo{}, err
		}
	}
	return s.commitVolume(rec, src)
}

// checkVolumeSpec validates a new volume's spec and returns its size,
// rounded up to whole blocks.
func checkVolumeSpec(spec VolumeSpec) (int64, error) {
	if err := ValidateID(spec.ID); err != nil {
		return 0, err
	}
	if spec.Size <= 0 || spec.Size > MaxVolumeSize {
		return 0, errf(ErrInvalid, "volume size %d not in (0, %d]", spec.Size, MaxVolumeSize)
	}
	if spec.SourceSnapshot != "" && spec.SourceVolume != "" {
		return 0, errf(ErrInvalid, "a volume has at most one source")
	}
	return roundUp(spec.Size), nil
}

// volumeSource is what a new volume starts on: parent, the layer below its
// head (nil for an empty volume); for a clone, vol, the source volume,
// whose head becomes parent, with the source's new head in created and the
// catalog changes for both in ops.
type volumeSource struct {
	parent  *layer
	vol     *volume
	created []*layer
	ops     []ondisk.Op
}

// freezeForClone flushes the head of srcVol, which the caller holds the
// barrier of, and prepares its freezing: a new head for srcVol and the
// catalog changes, applied by commitVolume. Caller holds topo.
func (s *Store) freezeForClone(srcVol *volume) (volumeSource, error) {
	frozen := srcVol.head.Load()
	s.dropStaleHeld(srcVol) // the caller holds its barrier
	if err := frozen.flush(s.layerFS); err != nil {
		return volumeSource{}, err
	}
	newHead, err := s.newLayer(frozen, srcVol.size.Load())
	if err != nil {
		return volumeSource{}, err
	}
	srcRec := *s.cat.volumes[srcVol.id]
	srcRec.Head = newHead.num
	frozenRec := layerRec(frozen)
	frozenRec.Frozen = true
	return volumeSource{parent: frozen, vol: srcVol, created: []*layer{newHead},
		ops: []ondisk.Op{{Kind: ondisk.OpPutLayer, Layer: frozenRec},
			{Kind: ondisk.OpPutLayer, Layer: layerRec(newHead)},
			{Kind: ondisk.OpPutVolume, Volume: &srcRec}}}, nil
}

// commitVolume creates the volume of rec on src in one catalog commit, and
// then in memory. Caller holds topo.
func (s *Store) commitVolume(rec *ondisk.VolumeRec, src volumeSource) (VolumeInfo, error) {
	created := src.created
	head, err := s.newLayerAfter(src.parent, rec.Size, created)
	if err != nil {
		for _, l := range created {
			s.discardLayer(l)
		}
		return VolumeInfo{}, err
	}
	created = append(created, head)
	rec.Head = head.num
	ops := append(src.ops, ondisk.Op{Kind: ondisk.OpPutLayer, Layer: layerRec(head)},
		ondisk.Op{Kind: ondisk.OpPutVolume, Volume: rec})
	if err := s.cat.commit(ops); err != nil {
		for _, l := range created {
			s.discardLayer(l)
		}
		return VolumeInfo{}, err
	}
	for _, l := range created {
		s.byNum[l.num] = l
		s.slots.set(l.num, l)
	}
	if src.vol != nil {
		src.parent.frozen = true
		src.vol.head.Store(created[0])
	}
	v := &volume{id: rec.ID, s: s}
	v.head.Store(head)
	v.size.Store(rec.Size)
	s.vols[rec.ID] = v
	return volumeInfo(rec), nil
}

// newLayerAfter is newLayer that also skips numbers taken by layers created
// earlier in the same, not yet committed, operation.
func (s *Store) newLayerAfter(parent *layer, size int64, pending []*layer) (*layer, error) {
	for _, p := range pending {
		s.byNum[p.num] = p
	}
	l, err := s.newLayer(parent, size)
	for _, p := range pending {
		delete(s.byNum, p.num)
	}
	return l, err
}

// DeleteVolume deletes a volume. Its head layer goes at once; layers below
// that no snapshot or other volume needs are merged or removed in the
// background.
func (s *Store) DeleteVolume(ctx context.Context, id string) error {
	s.topo.Lock()
	defer s.topo.Unlock()
	v, err := s.lookupVolume(id)
	if err != nil {
		return err
	}
	if v.handle != nil {
		return errf(ErrInUse, "volume %s is open", id)
	}
	if err := s.cat.commit([]ondisk.Op{{Kind: ondisk.OpDelVolume, ID: id}}); err != nil {
		return err
	}
	delete(s.vols, id)
	s.kickGC()
	return nil
}

// ExpandVolume grows a volume; it works while the volume is open.
func (s *Store) ExpandVolume(ctx context.Context, id string, size int64) (VolumeInfo, error) {
	if err := ValidateID(id); err != nil {
		return VolumeInfo{}, err
	}
	if size <= 0 || size > MaxVolumeSize {
		return VolumeInfo{}, errf(ErrInvalid, "volume size %d not in (0, %d]", size, MaxVolumeSize)
	}
	size = roundUp(size)
	s.topo.Lock()
	defer s.topo.Unlock()
	if err := s.checkOpen(); err != nil {
		return VolumeInfo{}, err
	}
	v, ok := s.vols[id]
	if !ok {
		return VolumeInfo{}, errf(ErrNotFound, "volume %s", id)
	}
	cur := s.cat.volumes[id]
	if size < cur.Size {
		return VolumeInfo{}, errf(ErrInvalid, "volume %s cannot shrink from %d to %d", id, cur.Size, size)
	}
	if size == cur.Size {
		return volumeInfo(cur), nil
	}
	v.barrier.Lock()
	defer v.barrier.Unlock()
	head := v.head.Load()
	rec := *cur
	rec.Size = size
	lrec := layerRec(head)
	lrec.Size = size
	if err := s.cat.commit([]ondisk.Op{{Kind: ondisk.OpPutLayer, Layer: lrec}, {Kind: ondisk.OpPutVolume, Volume: &rec}}); err != nil {
		return VolumeInfo{}, err
	}
	head.size.Store(size)
	v.size.Store(size)
	return volumeInfo(&rec), nil
}

// GetVolume looks a volume up.
func (s *Store) GetVolume(id string) (VolumeInfo, error) {
	return getRecord(s, id, "volume", func() map[string]*ondisk.VolumeRec { return s.cat.volumes }, volumeInfo)
}

// ListVolumes lists every volume, sorted by ID.
func (s *Store) ListVolumes() []VolumeInfo {
	return listRecords(s, func() map[string]*ondisk.VolumeRec { return s.cat.volumes }, volumeInfo,
		func(v VolumeInfo) string { return v.ID })
}
