package bench

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"time"
)

// Progress shows how far a run is. On a terminal it keeps a bar on the last
// line and prints each finished phase above it; elsewhere (a file, a CI log)
// it prints one plain line per finished phase. A nil *Progress shows nothing.
type Progress struct {
	w     io.Writer
	tty   bool
	width int

	mu      sync.Mutex
	total   int
	done    int
	failed  int
	label   string
	started time.Time
	drawn   bool
	stop    chan struct{}
	stopped chan struct{}
}

// NewProgress returns a progress display for total operations on w. tty
// says whether w is a terminal (of width columns).
func NewProgress(w io.Writer, tty bool, width, total int) *Progress {
	p := &Progress{w: w, tty: tty, width: width, total: total, started: time.Now()}
	if tty {
		// Redraw while a long operation runs, so the clock moves.
		p.stop, p.stopped = make(chan struct{}), make(chan struct{})
		go func() {
			defer close(p.stopped)
			t := time.NewTicker(250 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-p.stop:
					return
				case <-t.C:
					p.mu.Lock()
					p.draw()
					p.mu.Unlock()
				}
			}
		}()
	}
	return p
}

// AddTotal grows the number of operations expected.
func (p *Progress) AddTotal(n int) {
	if p == nil {
		return
	}
	p.mu.Lock()
	p.total += n
	p.mu.Unlock()
}

// Begin starts a phase; skipped operations (not run because what they
// depend on failed) count as done.
func (p *Progress) Begin(label string, skipped int) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.label = label
	p.done += max(skipped, 0)
	p.draw()
}

// Step counts one operation done.
func (p *Progress) Step(failed bool) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done++
	if failed {
		p.failed++
	}
}

// End finishes a phase with a summary line (none if empty).
func (p *Progress) End(summary string) {
	if summary == "" {
		return
	}
	p.Printf("%s", summary)
}

// Printf prints a line, above the bar on a terminal.
func (p *Progress) Printf(format string, args ...any) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	line := fmt.Sprintf(format, args...)
	if p.tty {
		fmt.Fprintf(p.w, "\r\033[K%s\n", line)
		p.drawn = false
		p.draw()
		return
	}
	pct := 100
	if p.total > 0 {
		pct = min(100, p.done*100/p.total)
	}
	fmt.Fprintf(p.w, "[%3d%% %s] %s\n", pct, clock(time.Since(p.started)), line)
}

// Finish removes the bar.
func (p *Progress) Finish() {
	if p == nil || !p.tty {
		return
	}
	close(p.stop)
	<-p.stopped
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.drawn {
		fmt.Fprint(p.w, "\r\033[K")
		p.drawn = false
	}
}

// draw redraws the bar; p.mu is held.
func (p *Progress) draw() {
	if !p.tty {
		return
	}
	const barWidth = 30
	if p.total == 0 {
		// Nothing planned yet: the driver or the cluster is being reached.
		fmt.Fprintf(p.w, "\r\033[K%s %s  connecting", strings.Repeat("░", barWidth), clock(time.Since(p.started)))
		p.drawn = true
		return
	}
	frac := min(1, float64(p.done)/float64(p.total))
	fill := int(frac * barWidth)
	bar := strings.Repeat("█", fill) + strings.Repeat("░", barWidth-fill)
	line := fmt.Sprintf("%s %3.0f%% %d/%d %s  %s", bar, frac*100, p.done, p.total, clock(time.Since(p.started)), p.label)
	if p.failed > 0 {
		line += fmt.Sprintf("  (%d failed)", p.failed)
	}
	if p.width > 0 {
		if r := []rune(line); len(r) > p.width-1 {
			line = string(r[:p.width-1])
		}
	}
	fmt.Fprintf(p.w, "\r\033[K%s", line)
	p.drawn = true
}

func clock(d time.Duration) string {
	s := int(d.Seconds())
	return fmt.Sprintf("%d:%02d", s/60, s%60)
}
