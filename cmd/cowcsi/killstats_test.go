package main

import (
	"fmt"
	"testing"
	"time"
)

// killStats sums up TestKillRandom's trials for its last log line.
type killStats struct {
	trials            int
	byTransport       map[string]int
	byMode            map[killMode]int
	byInFlight        map[string]int
	snapsOK, restored int
	durations         []time.Duration
	lastRingKill      time.Time
	killedConns       []killedConn
}

// killedConn is the FUSE connection of a killed driver, and the trial
// directory its mount was under.
type killedConn struct {
	conn int
	root string
}

func (s *killStats) add(transport string, k killRecord) {
	if s.byTransport == nil {
		s.byTransport, s.byMode, s.byInFlight = map[string]int{}, map[killMode]int{}, map[string]int{}
	}
	s.trials++
	s.byTransport[transport]++
	s.byMode[k.mode]++
	s.byInFlight[k.inFlight]++
	if transport == "on" {
		s.lastRingKill = k.at
	}
}

func (s *killStats) summary() string {
	var longest time.Duration
	for _, d := range s.durations {
		longest = max(longest, d)
	}
	return fmt.Sprintf("%d trials killed (transport %v, mode %v), kill landed during %v; %d snapshots returned OK, %d restored and checked; longest trial %v",
		s.trials, s.byTransport, s.byMode, s.byInFlight, s.snapsOK, s.restored, longest.Round(time.Millisecond))
}

// finalKmsgCheck: the teardown lines of a ring whose teardown never
// completes start 5 s after it began and come every 50 ms. Once that
// much time has passed since the last kill of a driver on the ring, the
// count must not grow over a second, unless the lines come from another
// process on this machine: none of the killed drivers' connections may
// still hold requests.
func (s *killStats) finalKmsgCheck(t *testing.T, kw *kmsgWatch) {
	if kw == nil || s.lastRingKill.IsZero() {
		return
	}
	if wait := time.Until(s.lastRingKill.Add(6 * time.Second)); wait > 0 {
		time.Sleep(wait) // until the kernel would have started logging
	}
	n0, _ := kw.count()
	time.Sleep(time.Second) // the observation window
	n1, last := kw.count()
	var stuck []string
	for _, k := range s.killedConns {
		if w, ok := stuckConn(k.conn, k.root); ok {
			stuck = append(stuck, fmt.Sprintf("%d (%d waiting)", k.conn, w))
		}
	}
	switch {
	case len(stuck) > 0:
		t.Errorf("FUSE connections of killed drivers still hold requests at the end: %v; the kernel logged %d %q lines in the last second; last: %s",
			stuck, n1-n0, teardownLogMarker, last)
	case n1 > n0:
		t.Logf("the kernel keeps logging %q (%d lines in 1 s), but no connection of this test holds requests: another process on this machine; last: %s",
			teardownLogMarker, n1-n0, last)
	default:
		t.Logf("kernel log: %d %q lines since the test began, none in the last second", n1, teardownLogMarker)
	}
}
