// Package cow is cowcsi's storage engine: volumes as chains of file-backed
// layers under an extent map, with O(1) snapshots, restores and clones.
//
// A store is a directory:
//
//	LOCK            flock: one process per store
//	catalog.log     volumes, snapshots, layers (package ondisk: framed, CRC32C)
//	layers/N.data   a layer's data: the blocks it owns, appended (see below)
//	layers/N.map    the journal of the blocks layer N owns and where they are
//
// # Layer files
//
// A layer's data file is dense: the first write of a block appends it to the
// file (runs of blocks written together stay together), and its journal
// record (journal version 2) says where it went, so the index holds a file
// offset for every block the layer owns. A layer written in random order
// after a snapshot is then a few large extents instead of thousands of small
// ones, which is what keeps first writes after a snapshot and reads through
// deep chains close to a plain file (docs/DECISIONS.md, "Dense layer files").
// The identity layout of pre-release builds (journal version 1: block b at
// byte b*BlockSize of a sparse file) is no longer read: opening a store
// with such a layer fails with ErrIdentityLayout. Space a layer gives back
// (discards, overwritten copies from a merge, blocks of a write that never
// became durable) is punched out, and the file is compacted at open: holes
// between used blocks are punched and the tail is cut.
//
// # Reads, writes and snapshots
//
// A volume's view of a block is the newest layer of its chain that owns it.
// Each layer keeps a resolved index (see index.go) that answers that in three
// lookups whatever the chain depth, shared between layers by path copying.
// Writes go to the head layer; CreateSnapshot freezes the head and starts a
// new, empty one whose index forks the frozen one: no data or map is copied,
// so its cost does not grow with size, data written or depth. Restore and
// clone put a new head on a frozen layer the same way.
//
// # Block size: 4 KiB
//
// The extent map tracks 4 KiB blocks. That is the logical block size the node
// gives the loop device, so every write the kernel sends covers whole blocks
// and never needs a copy-up: a write after a snapshot costs the same as any
// write, plus one index update the first time a block is touched. Larger
// chunks would shrink the map but make each first write after a snapshot read
// and rewrite the whole chunk (64 KiB chunks: 16x the I/O of a 4 KiB random
// write). The map stays small anyway: a leaf of the index covers 32 MiB; a
// leaf one layer owns is a few dozen bytes, a leaf mixing two layers 1 KiB (1
// bit per block). Index memory per TiB written is therefore at most 32 MiB
// for two layers mixed block by block and near zero for sequentially written
// data. Deep chains of spread writes cost more: every snapshot whose writes
// touch a leaf keeps its own copy of it, packed wider as owners add up (64
// snapshots each rewriting a 64th of every leaf: 16 GiB per TiB written;
// docs/DECISIONS.md, "Index memory per TiB written"). A dense layer also keeps where
// each block lies in its file: 8 bytes per run of blocks written together,
// so 8 bytes a block for random 4 KiB writes. A leaf of many runs keeps them
// in the store's location arena (arena.go), file-backed pages the kernel
// can write back and drop, so that those bytes are not heap the process can
// never give back. Unaligned writes from other callers still work: the
// engine copies up the partial edge blocks.
//
// # Durability
//
// Flush makes completed writes durable: fdatasync of the head's data, then
// the journal records of newly owned blocks (with their places in a dense
// file), fdatasynced. A block is owned only once its record is durable, so
// after a crash a block whose write was never flushed reads from below, as on
// a disk whose cache was lost, and the space it took in a dense file is
// reclaimed at open. Catalog changes are one checksummed frame each, durable
// with one fdatasync before they apply in memory. Discarded blocks are owned
// by the head as zero blocks (punched out of its data file), so they read as
// zeros, never as a parent's data.
//
// A failed fdatasync is final: Linux reports a writeback error once and
// marks the pages clean, so a retry would succeed over data that never
// reached the disk. Once an fdatasync of a layer's files fails, its volume
// refuses writes and flushes with EIO until the store is reopened from what
// is on disk. Open zeroes each journal after its last valid record, so that
// records a power cut left behind a gap never count again.
//
// The engine's file I/O goes through package faultfs (Options.Faults):
// plain system calls in production, and in tests a model of what reached
// the disk, which simulates power cuts (unsynced pages dropped, torn or
// reordered), fdatasync failures and a full disk.
//
// # Deleting snapshots
//
// Layers no volume or snapshot references are removed, or merged into their
// single child in the background (gc.go), so chain depth follows the number
// of live snapshots, not the number ever taken.
//
// The package imports no gRPC, CSI or Kubernetes code but klog, with which
// the merger logs the errors it retries.
package cow
