package k8smode

import (
	"context"
	"fmt"
	"sync"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/client-go/tools/cache"
)

// tracker turns the events of shared informers into waits for one object's
// condition: one watch per kind for the whole run, however many objects
// are in flight, and no polling.
type tracker struct {
	mu      sync.Mutex
	waiters map[string]map[*waiter]bool // kind/key
	change  chan struct{}               // closed at the next event
}

type result struct {
	obj any
	err error
}

type waiter struct {
	// cond says whether the wait is over, given the object or nil if it
	// does not exist; an error ends the wait with that error.
	cond func(obj any) (bool, error)
	done chan result
	once sync.Once
	last any // the last object seen, for a timeout's message
	mu   sync.Mutex
}

func newTracker() *tracker {
	return &tracker{waiters: map[string]map[*waiter]bool{}, change: make(chan struct{})}
}

// changed returns a channel closed at the next event of any kind.
func (t *tracker) changed() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.change
}

// handler is the event handler of kind's informer.
func (t *tracker) handler(kind string) cache.ResourceEventHandler {
	return cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { t.notify(kind, o, false) },
		UpdateFunc: func(_, o any) { t.notify(kind, o, false) },
		DeleteFunc: func(o any) { t.notify(kind, o, true) },
	}
}

func (t *tracker) notify(kind string, o any, deleted bool) {
	if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o, deleted = d.Obj, true
	}
	key, err := cache.MetaNamespaceKeyFunc(o)
	if err != nil {
		return
	}
	t.mu.Lock()
	var ws []*waiter
	for w := range t.waiters[kind+"/"+key] {
		ws = append(ws, w)
	}
	close(t.change)
	t.change = make(chan struct{})
	t.mu.Unlock()
	if deleted {
		o = nil
	}
	for _, w := range ws {
		w.check(o)
	}
}

func (w *waiter) check(o any) {
	if o != nil {
		w.mu.Lock()
		w.last = o
		w.mu.Unlock()
	}
	done, err := w.cond(o)
	if done || err != nil {
		w.once.Do(func() { w.done <- result{o, err} })
	}
}

// wait returns when cond holds for the object key ("namespace/name", or
// "name" for cluster-scoped kinds) of kind, whose informer's store is
// store, with the object it held for (nil: it does not exist); or when ctx
// ends: then describe turns the last object seen into words for the error.
// cond may be called from several goroutines at once: it must only look.
func (t *tracker) wait(ctx context.Context, kind, key string, store cache.Store, cond func(obj any) (bool, error), describe func(last any) string) (any, error) {
	w := &waiter{cond: cond, done: make(chan result, 1)}
	k := kind + "/" + key
	t.mu.Lock()
	if t.waiters[k] == nil {
		t.waiters[k] = map[*waiter]bool{}
	}
	t.waiters[k][w] = true
	t.mu.Unlock()
	defer func() {
		t.mu.Lock()
		delete(t.waiters[k], w)
		if len(t.waiters[k]) == 0 {
			delete(t.waiters, k)
		}
		t.mu.Unlock()
	}()
	// Registered first, then the store: an event between the two is seen
	// by one or the other.
	if o, ok, _ := store.GetByKey(key); ok {
		w.check(o)
	} else {
		w.check(nil)
	}
	select {
	case res := <-w.done:
		return res.obj, res.err
	case <-ctx.Done():
		w.mu.Lock()
		last := w.last
		w.mu.Unlock()
		if last == nil {
			if o, ok, _ := store.GetByKey(key); ok {
				last = o
			}
		}
		msg := "never seen"
		if last != nil {
			msg = describe(last)
		}
		return nil, fmt.Errorf("%s %s: %w (%s)", kind, key, context.Cause(ctx), msg)
	}
}

// name returns an object's name, for messages.
func name(o any) string {
	if m, err := meta.Accessor(o); err == nil {
		return m.GetName()
	}
	return "?"
}
