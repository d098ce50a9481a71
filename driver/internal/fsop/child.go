package fsop

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow"
	"github.com/cowcsi/cowcsi/cow/loopdev"
)

// childMain is the child process: it does what spec asks, writes its
// replies to standard output and returns the exit code. Exit code 0 means
// that nothing this child froze is left frozen.
func childMain(spec string) int {
	var req request
	if err := json.Unmarshal([]byte(spec), &req); err != nil {
		fmt.Fprintf(os.Stderr, "fsop: bad request %q: %v\n", spec, err)
		return 2
	}
	out := &replier{enc: json.NewEncoder(os.Stdout)}
	in := readLines(os.Stdin)
	if req.Op == opFreeze {
		return freezeChild(req, in, out)
	}
	// Standard input ends when the driver gives up on this request or
	// dies: stop then. A call stuck in the kernel still holds the exit
	// until it returns; the process then exits at once.
	go func() {
		for range in {
		}
		os.Exit(3)
	}()
	op, ok := oneShot[req.Op]
	if !ok {
		out.send(replyOf("", "", fmt.Errorf("fsop: unknown operation %q", req.Op)))
		return 2
	}
	res, err := op(req)
	out.send(replyOf("", res, err))
	return 0
}

// replier writes reply lines.
type replier struct{ enc *json.Encoder }

func (r *replier) send(rep reply) { _ = r.enc.Encode(rep) }

// readLines returns the lines of r on a channel, closed at EOF.
func readLines(r io.Reader) <-chan string {
	ch := make(chan string)
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			ch <- sc.Text()
		}
		close(ch)
	}()
	return ch
}

// oneShot are the requests that run one call and reply once.
var oneShot = map[string]func(request) (string, error){
	opThaw:     thawRecorded,
	opFlush:    func(req request) (string, error) { return "", flushLoop(req.Device) },
	opSyncFS:   func(req request) (string, error) { return "", syncFS(req.Path) },
	opProbe:    func(req request) (string, error) { return "", probe(req.Path) },
	opStatSize: statSize,
	opAttach:   attach,
	opResize:   resize,
	opDetach:   detach,
}

// flushLoop writes a loop device's dirty pages down to its backing file and
// has the loop driver fsync that file.
func flushLoop(dev string) error {
	d, err := loopdev.Open(dev)
	if err != nil {
		return err
	}
	return d.Sync()
}

func syncFS(path string) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		return fmt.Errorf("syncfs %s: %w", path, err)
	}
	return nil
}

// probe reads the first block of a file.
func probe(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, cow.BlockSize)
	if _, err := f.ReadAt(buf, 0); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}

// statSize returns the size the kernel reports for a file (a stat, which
// asks the FUSE server once its cached attributes were invalidated).
func statSize(req request) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(req.Path, &st); err != nil {
		return "", fmt.Errorf("stat %s: %w", req.Path, err)
	}
	return strconv.FormatInt(st.Size, 10), nil
}

// attach binds the FUSE file to a free loop device the way the driver
// wants it: 4096-byte logical blocks, direct I/O when the kernel accepts
// it, no autoclear (a block volume's users open and close the device; its
// detach is explicit).
func attach(req request) (string, error) {
	d, err := loopdev.Attach(context.Background(), req.Path, loopdev.Options{
		ReadOnly:         req.ReadOnly,
		DirectIO:         true,
		LogicalBlockSize: cow.BlockSize,
		Autoclear:        false,
	})
	if err != nil {
		return "", err
	}
	return d.Path, nil
}

func resize(req request) (string, error) {
	d, err := loopdev.Open(req.Device)
	if err != nil {
		return "", err
	}
	return "", d.Resize()
}
