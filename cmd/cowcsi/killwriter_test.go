package main

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The kill test's writer is this test binary re-executed in its own mount
// namespace, as a pod's process is: it writes numbered 4 KiB blocks with
// O_DIRECT and fdatasync to a block volume and numbered, fsync'd records
// appended to a file on an ext4 volume, and reports on fd 3 every sequence
// number whose sync returned ("b 12", "f 7"). Writes are sequential, so
// acknowledged means every number up to the last reported one. After the
// driver is killed its writes fail; it reports the error and then waits to
// be killed, which keeps its mount namespace (and the mounts the dead
// driver left in it) for the test to inspect.

const (
	envWriter   = "COWCSI_KILL_WRITER"
	blockSize   = 4096
	recordSize  = 64
	blockMagic  = "cowkillb"
	recordMagic = "cowkillr"
)

// writerMain runs the writer; args: block device, log file path, number
// of blocks to cycle through, tag.
func writerMain(args []string) int {
	if len(args) != 4 {
		fmt.Fprintf(os.Stderr, "writer: want 4 arguments, got %q\n", args)
		return 2
	}
	nblocks, err1 := strconv.ParseInt(args[2], 10, 64)
	tag, err2 := strconv.ParseUint(args[3], 10, 64)
	if err1 != nil || err2 != nil || nblocks <= 0 {
		fmt.Fprintf(os.Stderr, "writer: bad arguments %q\n", args)
		return 2
	}
	acks := os.NewFile(3, "acks")
	var mu sync.Mutex
	report := func(format string, a ...any) {
		mu.Lock()
		fmt.Fprintf(acks, format+"\n", a...)
		mu.Unlock()
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := writeBlocks(args[0], nblocks, tag, func(s int64) { report("b %d", s) }); err != nil {
			report("be %v", err)
		}
	})
	wg.Go(func() {
		if err := appendRecords(args[1], tag, func(s int64) { report("f %d", s) }); err != nil {
			report("fe %v", err)
		}
	})
	wg.Wait()
	report("done")
	for {
		// Until killed: the mount namespace stays for the test to inspect.
		time.Sleep(time.Hour)
	}
}

// alignedBlock returns a block-sized buffer aligned for O_DIRECT.
func alignedBlock(n int) []byte {
	buf := make([]byte, n+blockSize)
	off := int(uintptr(unsafe.Pointer(&buf[0])) & (blockSize - 1))
	if off != 0 {
		off = blockSize - off
	}
	return buf[off : off+n]
}

func writeBlocks(dev string, nblocks int64, tag uint64, ack func(int64)) error {
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	buf := alignedBlock(blockSize)
	for seq := int64(0); ; seq++ {
		fillBlock(buf, seq, tag)
		if _, err := unix.Pwrite(fd, buf, (seq%nblocks)*blockSize); err != nil {
			return fmt.Errorf("write block %d: %w", seq, err)
		}
		if err := unix.Fdatasync(fd); err != nil {
			return fmt.Errorf("fdatasync after block %d: %w", seq, err)
		}
		ack(seq)
	}
}

func appendRecords(path string, tag uint64, ack func(int64)) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	// The new name must be durable before the first record counts.
	if err := syncDir(filepath.Dir(path)); err != nil {
		return err
	}
	rec := make([]byte, recordSize)
	for seq := int64(0); ; seq++ {
		fillRecord(rec, seq, tag)
		if _, err := f.Write(rec); err != nil {
			return fmt.Errorf("append record %d: %w", seq, err)
		}
		if err := f.Sync(); err != nil {
			return fmt.Errorf("fsync after record %d: %w", seq, err)
		}
		ack(seq)
	}
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// fillBlock writes block seq: magic, seq, tag, then a pattern of seq.
func fillBlock(b []byte, seq int64, tag uint64) { fillPattern(b, blockMagic, seq, tag) }

func fillRecord(b []byte, seq int64, tag uint64) { fillPattern(b, recordMagic, seq, tag) }

func fillPattern(b []byte, magic string, seq int64, tag uint64) {
	copy(b, magic)
	binary.LittleEndian.PutUint64(b[8:], uint64(seq))
	binary.LittleEndian.PutUint64(b[16:], tag)
	x := uint64(seq)*0x9E3779B97F4A7C15 ^ tag
	for i := 24; i+8 <= len(b); i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[i:], x)
	}
}

// writerProc is the writer as the test sees it: the process and the last
// acknowledged sequence numbers (-1: none yet).
type writerProc struct {
	cmd               *exec.Cmd
	exited            chan struct{}
	drained           chan struct{} // the ack pipe reached EOF
	blkAcked, fsAcked atomic.Int64
	started           chan struct{} // both writers have an ack
	errs              []string      // the writer's reported errors, after drained
}

// startWriter starts the writer in a new mount namespace (made private, as
// a Kubernetes container's is by default) on the published paths.
func startWriter(blockTarget, logFile string, nblocks int64, tag uint64, stderr io.Writer) (*writerProc, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(os.Args[0], blockTarget, logFile, strconv.FormatInt(nblocks, 10), strconv.FormatUint(tag, 10))
	cmd.Env = append(os.Environ(), envWriter+"=1", noRaceExitSleep)
	cmd.ExtraFiles = []*os.File{w}
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		r.Close()
		w.Close()
		return nil, err
	}
	w.Close()
	wp := &writerProc{cmd: cmd, exited: make(chan struct{}), drained: make(chan struct{}), started: make(chan struct{})}
	wp.blkAcked.Store(-1)
	wp.fsAcked.Store(-1)
	manage(cmd.Process.Pid)
	go func() {
		cmd.Wait()
		unmanage(cmd.Process.Pid)
		close(wp.exited)
	}()
	go wp.readAcks(r)
	return wp, nil
}

func (wp *writerProc) readAcks(r *os.File) {
	defer close(wp.drained)
	defer r.Close()
	sc := bufio.NewScanner(r)
	startedOnce := false
	for sc.Scan() {
		line := sc.Text()
		kind, val, _ := strings.Cut(line, " ")
		n, err := strconv.ParseInt(val, 10, 64)
		switch {
		case kind == "b" && err == nil:
			wp.blkAcked.Store(n)
		case kind == "f" && err == nil:
			wp.fsAcked.Store(n)
		default:
			wp.errs = append(wp.errs, line)
		}
		if !startedOnce && wp.blkAcked.Load() >= 0 && wp.fsAcked.Load() >= 0 {
			startedOnce = true
			close(wp.started)
		}
	}
}

func (wp *writerProc) pid() int { return wp.cmd.Process.Pid }
