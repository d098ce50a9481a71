package driver

import (
	"context"
	"errors"
	"io/fs"

	"golang.org/x/sys/unix"

	"github.com/cowcsi/cowcsi/cow"
	"github.com/cowcsi/cowcsi/cow/loopdev"
)

// loopDevices implements LoopDevices with cow/loopdev.
type loopDevices struct{}

var _ LoopDevices = loopDevices{}

func (loopDevices) Attach(ctx context.Context, backing string, readOnly bool) (string, error) {
	d, err := loopdev.Attach(ctx, backing, loopdev.Options{
		ReadOnly:         readOnly,
		DirectIO:         true,
		LogicalBlockSize: cow.BlockSize,
		// No autoclear: a block volume's device is opened and closed by
		// its users, and the last close must not detach it. Detach is
		// explicit in NodeUnstageVolume.
		Autoclear: false,
	})
	if err != nil {
		return "", err
	}
	return d.Path, nil
}

func (loopDevices) Detach(ctx context.Context, dev, backing string) error {
	d, err := loopdev.Open(dev)
	if err != nil {
		if gone(err) {
			return nil
		}
		return err
	}
	if backing != "" && d.BackingFile != "" && d.BackingFile != backing {
		return nil // the number was reused: not ours any more
	}
	err = d.Detach()
	if errors.Is(err, loopdev.ErrBusy) {
		// The kernel detaches on last close (e.g. a lazily unmounted
		// filesystem still in use); nothing more we can do.
		return nil
	}
	return err
}

func (loopDevices) Resize(ctx context.Context, dev string) error {
	d, err := loopdev.Open(dev)
	if err != nil {
		return err
	}
	return d.Resize()
}

func (loopDevices) Sync(ctx context.Context, dev string) error {
	d, err := loopdev.Open(dev)
	if err != nil {
		return err
	}
	return d.Sync()
}

func (loopDevices) BackingFile(dev string) (string, error) {
	d, err := loopdev.Open(dev)
	if err != nil {
		return "", err
	}
	return d.BackingFile, nil
}

func (loopDevices) FindByBacking(backing string) ([]string, error) {
	ds, err := loopdev.FindByBacking(backing)
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(ds))
	for _, d := range ds {
		out = append(out, d.Path)
	}
	return out, nil
}

func gone(err error) bool {
	return errors.Is(err, unix.ENXIO) || errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENODEV)
}
