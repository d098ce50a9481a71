package cow

// Test hooks for the black-box tests of package cow_test.

// GCFailures is how many passes of the merger have met an error.
func GCFailures(s *Store) int64 { return s.gcFailures.Load() }

// LiveLayers is how many layers the store holds.
func LiveLayers(s *Store) int {
	s.topo.Lock()
	defer s.topo.Unlock()
	return len(s.byNum)
}

// SetLayerLimit makes layer numbers stop below n (n-1 numbers in use at
// most), so that a test can cross the limit.
func SetLayerLimit(s *Store, n uint32) {
	s.topo.Lock()
	defer s.topo.Unlock()
	s.nums.limit = n
}
