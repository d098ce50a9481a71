// Package fsop runs the system calls that may wait on the driver's own FUSE
// connection in a short-lived child process.
//
// The driver serves the FUSE files under its loop devices. A syscall that
// comes back through that connection (FIFREEZE and FITHAW of a staging
// filesystem, syncfs, fsync of a loop device, reading or stat-ing a FUSE
// file, the open and LOOP_CONFIGURE of a loop attach) waits
// uninterruptibly once the server has read its request. If the driver is
// SIGKILLed then, the waiting thread keeps the process from exiting, so
// /dev/fuse is never closed and the connection never aborted: the node
// wedges. Made by a child process instead, such a call can only hold up
// the child: the driver exits, the kernel aborts the connection, the call
// fails and the child exits too.
//
// The child is the running binary itself (/proc/self/exe) with the request
// in the COWCSI_FSOP environment variable; this package's init recognises
// it, does the work and exits before main (or a test's TestMain) runs. So
// every binary that links the driver can be its own child. The child
// inherits only its standard descriptors (everything else the driver opens
// is close-on-exec, /dev/fuse and io_uring rings included), and it stops
// when its standard input reaches EOF: the driver closed it, or died.
package fsop

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// envRequest carries the JSON request to the child.
const envRequest = "COWCSI_FSOP"

// Operations.
const (
	opFreeze   = "freeze"
	opThaw     = "thaw"
	opFlush    = "flush"
	opSyncFS   = "syncfs"
	opProbe    = "probe"
	opStatSize = "statsize"
	opAttach   = "attach"
	opResize   = "resize"
	opDetach   = "detach"
)

// ErrNotMounted: the path to freeze is not on the volume's loop device (its
// staging mount is missing), so nothing was frozen.
var ErrNotMounted = errors.New("not the volume's filesystem")

// ErrExpired: the frozen window ended (the child thawed by its own deadline)
// before the driver asked to thaw; what was cut meanwhile may not be
// consistent.
var ErrExpired = fmt.Errorf("frozen window expired: %w", context.DeadlineExceeded)

// request is what the child is asked to do.
type request struct {
	Op string `json:"op"`
	// Path: the staging directory (freeze, syncfs), the FUSE file
	// (probe, statsize, attach's backing file, detach's expected backing
	// file).
	Path string `json:"path,omitempty"`
	// Paths: where a recorded freeze may be reached (thaw).
	Paths []string `json:"paths,omitempty"`
	// Device: the loop device (/dev/loopN).
	Device string `json:"device,omitempty"`
	// Dev: the device number the filesystem to thaw must be on.
	Dev      uint64        `json:"dev,omitempty"`
	ReadOnly bool          `json:"readOnly,omitempty"`
	Window   time.Duration `json:"window,omitempty"`
}

// reply is one line the child writes to its standard output.
type reply struct {
	State  string `json:"state,omitempty"`
	Result string `json:"result,omitempty"`
	Err    string `json:"err,omitempty"`
	Errno  int    `json:"errno,omitempty"`
	// NotMounted and Expired mark ErrNotMounted and ErrExpired.
	NotMounted bool `json:"notMounted,omitempty"`
	Expired    bool `json:"expired,omitempty"`
}

func replyOf(state, result string, err error) reply {
	r := reply{State: state, Result: result}
	if err != nil {
		r.Err = err.Error()
		var errno syscall.Errno
		if errors.As(err, &errno) {
			r.Errno = int(errno)
		}
		r.NotMounted = errors.Is(err, ErrNotMounted)
		r.Expired = errors.Is(err, ErrExpired)
	}
	return r
}

// err rebuilds the child's error, keeping what callers test with
// errors.Is: the errno, ErrNotMounted and ErrExpired.
func (r reply) err() error {
	switch {
	case r.Err == "":
		return nil
	case r.NotMounted:
		return childError{msg: r.Err, is: ErrNotMounted}
	case r.Expired:
		return childError{msg: r.Err, is: ErrExpired}
	case r.Errno != 0:
		return childError{msg: r.Err, is: syscall.Errno(r.Errno)}
	}
	return errors.New(r.Err)
}

// childError is an error from the child, with the sentinel or errno it
// wrapped there.
type childError struct {
	msg string
	is  error
}

func (e childError) Error() string { return e.msg }
func (e childError) Unwrap() error { return e.is }

func init() {
	if spec, ok := os.LookupEnv(envRequest); ok {
		os.Exit(childMain(spec))
	}
}

// child is a running child process, seen from the driver.
type child struct {
	cmd     *exec.Cmd
	stdin   io.WriteCloser
	replies chan reply    // closed when its standard output ends
	exited  chan struct{} // closed once it has exited and is reaped
	stderr  *tailBuffer
	waitErr error // valid once exited is closed
	closeIn sync.Once
}

// exe is the binary the children run; a variable so that a test can point
// it at something that does not start.
var exe = "/proc/self/exe"

// start starts a child for req. It is deliberately not tied to a context:
// a context's end kills, and a child holding a freeze must thaw first
// (closing its standard input asks it to).
func start(req request) (*child, error) {
	spec, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe)
	cmd.Args = []string{"cowcsi-fsop", req.Op}
	cmd.Env = []string{envRequest + "=" + string(spec)}
	c := &child{cmd: cmd, replies: make(chan reply, 4), exited: make(chan struct{}), stderr: &tailBuffer{max: 4096}}
	cmd.Stderr = c.stderr
	if c.stdin, err = cmd.StdinPipe(); err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("fsop: start child for %s: %w", req.Op, err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var r reply
			if json.Unmarshal(sc.Bytes(), &r) == nil {
				c.replies <- r
			}
		}
		close(c.replies)
		c.waitErr = cmd.Wait()
		close(c.exited)
	}()
	return c, nil
}

// closeStdin tells the child to stop (a freeze child thaws first).
func (c *child) closeStdin() { c.closeIn.Do(func() { c.stdin.Close() }) }

// kill ends a child that holds nothing that must be undone.
func (c *child) kill() {
	c.closeStdin()
	_ = c.cmd.Process.Kill()
}

// Pid is the child's process ID.
func (c *child) Pid() int { return c.cmd.Process.Pid }

// gone describes a child that exited without the reply it owed.
func (c *child) gone(op string) error {
	<-c.exited
	msg := strings.TrimSpace(c.stderr.String())
	if msg != "" {
		msg = ": " + msg
	}
	return fmt.Errorf("fsop: %s child ended without a reply (%v)%s", op, c.waitErr, msg)
}

// run does a one-shot request: it returns the child's result, or ctx's
// error when ctx ends first (the child is then killed and reaped later;
// a child stuck in the kernel ends when its call returns).
func run(ctx context.Context, req request) (string, error) {
	c, err := start(req)
	if err != nil {
		return "", err
	}
	defer c.closeStdin()
	select {
	case r, ok := <-c.replies:
		if !ok {
			return "", c.gone(req.Op)
		}
		return r.Result, c.reaped(ctx, r.err())
	case <-ctx.Done():
		c.kill()
		return "", fmt.Errorf("fsop: %s: %w", req.Op, ctx.Err())
	}
}

// reaped waits until the child has exited, at most until ctx ends, and
// returns err. A child that still runs holds what it opened (a staging
// directory: an unmount right after would find it busy).
func (c *child) reaped(ctx context.Context, err error) error {
	c.closeStdin()
	select {
	case <-c.exited:
	case <-ctx.Done():
	}
	return err
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > t.max {
		t.b = t.b[len(t.b)-t.max:]
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
