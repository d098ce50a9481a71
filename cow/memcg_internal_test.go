package cow

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
)

// memCgroup is a memory cgroup made for one test (cgroup v2 where the
// memory controller is there, else v1's memory hierarchy), removed at the
// end of the test.
type memCgroup struct {
	dir string
	v2  bool
}

// newMemCgroup makes a memory cgroup below this process's own, limited to
// limit bytes with no swap. It skips the test where there is no memory
// controller it can use.
func newMemCgroup(t *testing.T, limit int64) *memCgroup {
	t.Helper()
	name := fmt.Sprintf("cowcsi-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	var cg *memCgroup
	if mnt, path, ok := cgroupOf("cgroup2", ""); ok {
		parent := filepath.Join(mnt, path)
		if ctl, err := os.ReadFile(filepath.Join(parent, "cgroup.controllers")); err == nil && strings.Contains(string(ctl), "memory") {
			_ = os.WriteFile(filepath.Join(parent, "cgroup.subtree_control"), []byte("+memory"), 0)
			cg = &memCgroup{dir: filepath.Join(parent, name), v2: true}
		}
	}
	if cg == nil {
		mnt, path, ok := cgroupOf("cgroup", "memory")
		if !ok {
			t.Skip("no memory cgroup controller")
		}
		cg = &memCgroup{dir: filepath.Join(mnt, path, name)}
	}
	if err := os.Mkdir(cg.dir, 0o755); err != nil {
		t.Skipf("cannot make a memory cgroup: %v", err)
	}
	t.Cleanup(func() {
		// The kernel refuses the rmdir while the cgroup's last process
		// is still being torn down.
		var err error
		for range 50 {
			if err = os.Remove(cg.dir); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("remove cgroup %s: %v", cg.dir, err)
	})
	limits := map[string]string{"memory.limit_in_bytes": strconv.FormatInt(limit, 10)}
	if cg.v2 {
		limits = map[string]string{"memory.max": strconv.FormatInt(limit, 10), "memory.swap.max": "0"}
	}
	for f, v := range limits {
		if err := os.WriteFile(filepath.Join(cg.dir, f), []byte(v), 0); err != nil && !(f == "memory.swap.max" && errors.Is(err, os.ErrNotExist)) {
			t.Fatalf("cgroup %s: %v", f, err)
		}
	}
	return cg
}

// add moves process pid into the cgroup.
func (cg *memCgroup) add(pid int) error {
	return os.WriteFile(filepath.Join(cg.dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0)
}

// summary returns the cgroup's peak usage and limit events.
func (cg *memCgroup) summary() string {
	files := []string{"memory.max_usage_in_bytes", "memory.failcnt", "memory.oom_control"}
	if cg.v2 {
		files = []string{"memory.peak", "memory.events"}
	}
	var b strings.Builder
	for _, f := range files {
		v, err := os.ReadFile(filepath.Join(cg.dir, f))
		if err != nil {
			continue
		}
		fmt.Fprintf(&b, "%s: %s; ", f, strings.Join(strings.Fields(string(v)), " "))
	}
	return b.String()
}

// cgroupOf returns the mount point of the cgroup filesystem of type fstype
// (with controller among its options, if not empty) and this process's
// path in it.
func cgroupOf(fstype, controller string) (mnt, path string, ok bool) {
	ms, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		if m.FSType != fstype {
			return true, false
		}
		if controller != "" && !strings.Contains(","+m.VFSOptions+",", ","+controller+",") {
			return true, false
		}
		return false, true
	})
	if err != nil || len(ms) == 0 {
		return "", "", false
	}
	mnt = ms[0].Mountpoint
	if mnt == "" {
		return "", "", false
	}
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", "", false
	}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if fstype == "cgroup2" && parts[0] == "0" && parts[1] == "" {
			return mnt, parts[2], true
		}
		if fstype == "cgroup" && strings.Contains(","+parts[1]+",", ","+controller+",") {
			return mnt, parts[2], true
		}
	}
	return "", "", false
}
