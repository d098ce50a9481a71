package cow

import (
	"context"
	"sort"
	"time"

	"github.com/cowcsi/cowcsi/cow/internal/ondisk"
)

// The store's snapshots: taking them, one volume or a group at one
// instant, deleting and looking them up.

func snapshotInfo(r *ondisk.SnapshotRec) SnapshotInfo {
	return SnapshotInfo{ID: r.ID, VolumeID: r.VolumeID, Size: r.Size, Labels: copyLabels(r.Labels),
		CreatedAt: time.Unix(0, r.Created)}
}

// CreateSnapshot freezes the volume's head as the snapshot and starts a new,
// empty head: no data or map is copied. In-flight writes finish first and the
// head is flushed, so the snapshot holds every write that returned before.
func (s *Store) CreateSnapshot(ctx context.Context, spec SnapshotSpec) (SnapshotInfo, error) {
	infos, err := s.CreateSnapshotGroup(ctx, []SnapshotSpec{spec})
	if err != nil {
		return SnapshotInfo{}, err
	}
	return infos[0], nil
}

// CreateSnapshotGroup snapshots several volumes at one instant: all their
// write barriers are held together and one catalog commit creates all.
func (s *Store) CreateSnapshotGroup(ctx context.Context, specs []SnapshotSpec) ([]SnapshotInfo, error) {
	if err := checkSnapshotSpecs(specs); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.topo.Lock()
	defer s.topo.Unlock()
	if err := s.checkOpen(); err != nil {
		return nil, err
	}
	vols := make([]*volume, len(specs))
	for i, sp := range specs {
		if _, ok := s.cat.snaps[sp.ID]; ok {
			return nil, errf(ErrExists, "snapshot %s", sp.ID)
		}
		v, ok := s.vols[sp.VolumeID]
		if !ok {
			return nil, errf(ErrNotFound, "volume %s", sp.VolumeID)
		}
		vols[i] = v
	}
	// Lock barriers in ID order so concurrent groups cannot deadlock (topo
	// already serializes them; the order is for clarity and future changes).
	order := append([]*volume(nil), vols...)
	sort.Slice(order, func(i, j int) bool { return order[i].id < order[j].id })
	for _, v := range order {
		v.barrier.Lock()
		defer v.barrier.Unlock()
	}
	s.dropStaleHeld(vols...)
	recs, created, ops, err := s.freezeHeads(specs, vols)
	if err == nil {
		err = s.cat.commit(ops)
	}
	if err != nil {
		for _, l := range created {
			s.discardLayer(l)
		}
		return nil, err
	}
	out := make([]SnapshotInfo, len(specs))
	for i, v := range vols {
		v.head.Load().frozen = true
		s.byNum[created[i].num] = created[i]
		s.slots.set(created[i].num, created[i])
		v.head.Store(created[i])
		out[i] = snapshotInfo(recs[i])
	}
	return out, nil
}

// checkSnapshotSpecs validates the specs of a snapshot group: valid IDs,
// none named twice.
func checkSnapshotSpecs(specs []SnapshotSpec) error {
	if len(specs) == 0 {
		return errf(ErrInvalid, "no snapshots requested")
	}
	ids, vids := map[string]bool{}, map[string]bool{}
	for _, sp := range specs {
		if err := ValidateID(sp.ID); err != nil {
			return err
		}
		if err := ValidateID(sp.VolumeID); err != nil {
			return err
		}
		if ids[sp.ID] || vids[sp.VolumeID] {
			return errf(ErrInvalid, "snapshot or volume named twice in one group")
		}
		ids[sp.ID], vids[sp.VolumeID] = true, true
	}
	return nil
}

// freezeHeads flushes the head of each volume of a snapshot group (the
// caller holds topo and their barriers) and prepares the snapshots: their
// records, a new head for each volume (created, in order; the caller
// discards them if the commit does not happen), and the catalog changes.
func (s *Store) freezeHeads(specs []SnapshotSpec, vols []*volume) (recs []*ondisk.SnapshotRec, created []*layer, ops []ondisk.Op, err error) {
	now := time.Now().UnixNano()
	recs = make([]*ondisk.SnapshotRec, len(specs))
	for i, sp := range specs {
		v := vols[i]
		head := v.head.Load()
		if err := head.flush(s.layerFS); err != nil {
			return nil, created, nil, err
		}
		nh, err := s.newLayerAfter(head, v.size.Load(), created)
		if err != nil {
			return nil, created, nil, err
		}
		created = append(created, nh)
		frozenRec := layerRec(head)
		frozenRec.Frozen = true
		vrec := *s.cat.volumes[v.id]
		vrec.Head = nh.num
		recs[i] = &ondisk.SnapshotRec{ID: sp.ID, VolumeID: v.id, Layer: head.num, Size: v.size.Load(),
			Labels: copyLabels(sp.Labels), Created: now}
		ops = append(ops, ondisk.Op{Kind: ondisk.OpPutLayer, Layer: frozenRec},
			ondisk.Op{Kind: ondisk.OpPutLayer, Layer: layerRec(nh)},
			ondisk.Op{Kind: ondisk.OpPutVolume, Volume: &vrec},
			ondisk.Op{Kind: ondisk.OpPutSnapshot, Snapshot: recs[i]})
	}
	return recs, created, ops, nil
}

// DeleteSnapshot deletes a snapshot. Volumes restored or cloned from it keep
// working: its layer stays while they need it and is merged into its single
// remaining child in the background.
func (s *Store) DeleteSnapshot(ctx context.Context, id string) error {
	s.topo.Lock()
	defer s.topo.Unlock()
	if _, _, err := s.snapshotLayer(id); err != nil {
		return err
	}
	if err := s.cat.commit([]ondisk.Op{{Kind: ondisk.OpDelSnapshot, ID: id}}); err != nil {
		return err
	}
	s.kickGC()
	return nil
}

// GetSnapshot looks a snapshot up.
func (s *Store) GetSnapshot(id string) (SnapshotInfo, error) {
	return getRecord(s, id, "snapshot", func() map[string]*ondisk.SnapshotRec { return s.cat.snaps }, snapshotInfo)
}

// ListSnapshots lists every snapshot, sorted by ID.
func (s *Store) ListSnapshots() []SnapshotInfo {
	return listRecords(s, func() map[string]*ondisk.SnapshotRec { return s.cat.snaps }, snapshotInfo,
		func(v SnapshotInfo) string { return v.ID })
}
