package driver

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// errNodeFull: the node cannot stage another volume (toStatus:
// RESOURCE_EXHAUSTED, the spec's code for "max volumes attached").
var errNodeFull = errors.New("node volume limit reached")

// A staged volume holds a few descriptors in the driver (its engine
// layers' files; the loop device and the FUSE file hold none here), more
// with snapshots and clones. fdsPerVolume is the budget per volume from
// which the default volume limit is derived; fdReserve is kept free for
// everything else (the store, gRPC connections, FUSE, mkfs and mount).
const (
	fdsPerVolume = 8
	fdReserve    = 256
)

// Descriptor figures, as variables so that a test can shrink the limit.
var (
	// openFDs counts this process's open descriptors.
	openFDs = func() (int, error) {
		ents, err := os.ReadDir("/proc/self/fd")
		return len(ents), err
	}
	// fdLimit is the soft RLIMIT_NOFILE; the Go runtime raises it to the
	// hard limit at startup.
	fdLimit = func() (int, error) {
		var rl unix.Rlimit
		if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil {
			return 0, err
		}
		return int(min(rl.Cur, 1<<30)), nil
	}
)

// volumeLimit is the number of volumes this node stages at most, which
// NodeGetInfo reports as max_volumes_per_node: --max-volumes-per-node if
// set, else what the descriptor limit allows at fdsPerVolume each.
func (o *Options) volumeLimit() int64 {
	if o.MaxVolumesPerNode > 0 {
		return o.MaxVolumesPerNode
	}
	limit, err := fdLimit()
	if err != nil {
		return 0 // unknown: no limit reported
	}
	return int64(max((limit-fdReserve)/fdsPerVolume, 1))
}

// checkRoom fails wrapping errNodeFull if staging one more volume would go
// past the volume limit or leave fewer than fdReserve descriptors free;
// the CO sees RESOURCE_EXHAUSTED and the node's max_volumes_per_node.
func (n *nodeService) checkRoom() error {
	n.mu.Lock()
	staged := len(n.vols)
	n.mu.Unlock()
	if limit := n.d.opts.volumeLimit(); limit > 0 && int64(staged) >= limit {
		return fmt.Errorf("%w: %d volumes staged, the node's limit is %d (--max-volumes-per-node, or the descriptor limit at %d per volume)",
			errNodeFull, staged, limit, fdsPerVolume)
	}
	open, err := openFDs()
	if err != nil {
		return nil // cannot tell: let the stage try
	}
	if limit, err := fdLimit(); err == nil && limit-open < fdReserve+fdsPerVolume {
		return fmt.Errorf("%w: %d of %d descriptors (RLIMIT_NOFILE) in use", errNodeFull, open, limit)
	}
	return nil
}
