package cow

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error the engine returns for a caller's mistake or a
// resource condition wraps exactly one of these, so the driver can map them to
// gRPC codes in one errors.Is switch.
var (
	// ErrNotFound: the volume, snapshot or layer does not exist.
	ErrNotFound = errors.New("not found")
	// ErrExists: an object with that ID already exists.
	ErrExists = errors.New("already exists")
	// ErrInvalid: a malformed ID, size, offset or argument.
	ErrInvalid = errors.New("invalid argument")
	// ErrNoSpace: the filesystem under the store is full (ENOSPC/EDQUOT).
	ErrNoSpace = errors.New("no space left in store")
	// ErrInUse: the object is open, attached or otherwise busy.
	ErrInUse = errors.New("in use")
	// ErrClosed: the store or volume handle has been closed.
	ErrClosed = errors.New("closed")
	// ErrCorrupt: on-disk metadata failed validation.
	ErrCorrupt = errors.New("corrupt metadata")
	// ErrIdentityLayout: a layer's journal is of version 1, the identity
	// layout (block b at byte b*BlockSize of a sparse file) of pre-release
	// builds, which this build no longer reads.
	ErrIdentityLayout = errors.New("the identity-layout layer format of pre-release builds is no longer supported")
)

func errf(sentinel error, format string, args ...any) error {
	return fmt.Errorf("%w: %s", sentinel, fmt.Sprintf(format, args...))
}
