package csimode

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// cowcsiProc is a cowcsi started by cowbench on a store of its own.
type cowcsiProc struct {
	cmd      *exec.Cmd
	log      *os.File
	endpoint string
	exited   chan struct{}
	waitErr  error
}

// findCowcsi looks for the driver binary: the flag, next to cowbench (make
// build puts both in bin/), then $PATH.
func findCowcsi(flagPath string) (string, error) {
	if flagPath != "" {
		if _, err := os.Stat(flagPath); err != nil {
			return "", fmt.Errorf("--cowcsi: %w", err)
		}
		return flagPath, nil
	}
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "cowcsi")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	p, err := exec.LookPath("cowcsi")
	if err != nil {
		return "", errors.New("--start-driver: the cowcsi binary is neither next to cowbench nor in $PATH: build it with `make build`, or pass --cowcsi PATH")
	}
	return p, nil
}

// startCowcsi runs cowcsi with its store, socket and log in dir.
func startCowcsi(bin, dir string) (*cowcsiProc, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("--start-driver needs root: cowcsi attaches loop devices, serves FUSE and mounts filesystems")
	}
	sock := filepath.Join(dir, "csi.sock")
	log, err := os.Create(filepath.Join(dir, "cowcsi.log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "--endpoint=unix://"+sock, "--nodeid=cowbench-node",
		"--store-dir="+filepath.Join(dir, "store"), "--v=2")
	cmd.Stdout, cmd.Stderr = log, log
	// A process group of its own: Ctrl-C on the terminal goes to cowbench,
	// which cleans up through the driver before stopping it. Pdeathsig stops
	// the driver if cowbench is killed outright.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		log.Close()
		return nil, fmt.Errorf("starting %s: %w", bin, err)
	}
	p := &cowcsiProc{cmd: cmd, log: log, endpoint: "unix://" + sock, exited: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	return p, nil
}

// alive returns an error, with the end of the log, if the driver exited.
func (p *cowcsiProc) alive() error {
	select {
	case <-p.exited:
		return fmt.Errorf("cowcsi exited (%v); the end of %s:\n%s", p.waitErr, p.log.Name(), p.tail(15))
	default:
		return nil
	}
}

// stop asks the driver to stop and waits for it, then kills it.
func (p *cowcsiProc) stop() error {
	defer p.log.Close()
	select {
	case <-p.exited:
		return nil
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return nil
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
		return fmt.Errorf("cowcsi did not stop within 30s of SIGTERM; killed (log %s)", p.log.Name())
	}
}

func (p *cowcsiProc) tail(n int) string {
	b, err := os.ReadFile(p.log.Name())
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(string(bytes.TrimRight(b, "\n")), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
