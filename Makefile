# cowcsi — see README.md. Every target runs on this machine as root.
GO       ?= go
BIN      := bin
GOBIN    := $(shell $(GO) env GOPATH)/bin
PKGS     := ./...
# Tests mount, attach loop devices and serve FUSE: they need root.
TESTFLAGS ?= -race -count=1 -timeout 30m
# test/fuse-guard.sh stops a run still going after this many minutes: a
# process stuck on its own FUSE mount outlives go test's -timeout.
TEST_GUARD_MINUTES ?= 45
FUZZTIME ?= 20s

.PHONY: all build test lint fmt demo bench fuzz image verify deps clean

all: build

deps:
	bash test/install-deps.sh

build:
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ ./cmd/...

# Correctness only: the tests that run a benchmark at length are left to
# bench-io-check (test/bench-io) and to their own switches
# (COWCSI_FUSE_BENCH); each tool keeps a cheap smoke test here.
test: deps
	bash test/fuse-guard.sh run $(TEST_GUARD_MINUTES) $(GO) test $(TESTFLAGS) $(PKGS)

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet $(PKGS)
	$(GOBIN)/staticcheck $(PKGS)

fmt:
	gofmt -w $$(git ls-files '*.go')

# The article's story through the CSI API on a temporary store, real mounts.
demo: deps build
	$(BIN)/cowdemo

# Engine benchmarks (docs/BENCHMARKS.md records a run).
bench:
	$(GO) test -run '^$$' -bench . -benchtime 1x ./cow/

# Every fuzz target for FUZZTIME each.
fuzz:
	@for t in $$($(GO) test -list 'Fuzz.*' ./cow/internal/ondisk | grep ^Fuzz); do \
		echo "== $$t"; $(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) ./cow/internal/ondisk || exit 1; \
	done

# No Docker engine runs on the development machines; this needs one.
image:
	docker build -t cowcsi:dev .

# Fails if go.mod/go.sum are not tidy or code is not formatted.
verify:
	$(GO) mod tidy -diff
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))"

clean:
	rm -rf $(BIN)

# e2e ---------------------------------------------------------------------
# The real snapshot stack on a local control plane (test/e2e, docs/E2E.md).
# The binaries are built once from test/e2e/tools into ~/.cache/cowcsi
# (kube-apiserver takes about 8 minutes on 2 cores the first time).
E2EFLAGS ?= -count=1 -timeout 30m -v

.PHONY: e2e e2e-tools e2e-bench

# `make test` runs test/e2e too; build its tools first, outside the test
# timeout (the test binary would build them itself otherwise).
test: e2e-tools

e2e-tools:
	bash test/e2e/build-tools.sh

e2e: deps e2e-tools
	$(GO) test $(E2EFLAGS) ./test/e2e/

# TestLatency alone; writes its Markdown report to bin/e2e-bench.md.
e2e-bench: deps e2e-tools
	@mkdir -p $(BIN)
	COWCSI_E2E_BENCH_OUT=$(CURDIR)/$(BIN)/e2e-bench.md $(GO) test $(E2EFLAGS) -run '^TestLatency$$' ./test/e2e/
	@echo "report: $(BIN)/e2e-bench.md"

# bench-io ----------------------------------------------------------------
# The data path against its limit with fio (test/bench-io, docs/BENCHMARKS.md
# "Data path (fio)"): about 15 minutes with the defaults. Results in
# BENCH_IO_OUT; e.g. BENCH_IO_FLAGS='-only raw -rounds 5'.
BENCH_IO_OUT   ?= /var/tmp/cowcsi-bench-io.json
BENCH_IO_FLAGS ?=

.PHONY: bench-io

bench-io:
	bash test/bench-io/bench-io.sh -out $(BENCH_IO_OUT) $(BENCH_IO_FLAGS)

# The working tree against an older revision (default HEAD: the change not
# yet committed), alternating binaries: make bench-io-ab BENCH_IO_OLD=<rev>
# BENCH_IO_FLAGS='-only raw -rounds 3'
BENCH_IO_OLD ?= HEAD
.PHONY: bench-io-ab
bench-io-ab:
	bash test/bench-io/ab.sh $(BENCH_IO_OLD) $(BENCH_IO_FLAGS)

# bench-io's own tests at full length (COWCSI_BENCH_IO=1): TestSmoke over
# every row, and TestAB, which builds HEAD's bench-io in a git worktree and
# runs ab.sh. `make test` runs TestSmoke over one raw and one ext4 row only.
.PHONY: bench-io-check
bench-io-check: deps
	bash test/fuse-guard.sh run $(TEST_GUARD_MINUTES) env COWCSI_BENCH_IO=1 $(GO) test $(TESTFLAGS) -v -run '^(TestSmoke|TestAB)$$' ./test/bench-io/

# scale -------------------------------------------------------------------
# TestScale (cmd/cowcsi) at SCALE volumes on one driver, a tenth ext4:
# staging, I/O, snapshots, restores and unstaging, logging the driver's
# descriptors, RSS, threads and loop devices. No -race, so that the RSS is
# the binary's own. `make test` runs it at 24 volumes.
SCALE ?= 500
.PHONY: scale
scale: deps
	bash test/fuse-guard.sh run $(TEST_GUARD_MINUTES) env COWCSI_SCALE=$(SCALE) $(GO) test -count=1 -timeout 30m -v -run '^TestScale$$' ./cmd/cowcsi/

# powercut-long ------------------------------------------------------------
# TestPowerCut at length: 2,000 simulated power cuts (drop, tear, keep), with
# fdatasync EIO and ENOSPC rounds, on one store (cow/powercut_test.go).
POWERCUT_CUTS ?= 2000
.PHONY: powercut-long
powercut-long:
	COW_POWERCUT_CUTS=$(POWERCUT_CUTS) $(GO) test -count=1 -timeout 60m -v -run '^TestPowerCut$$' ./cow/

# kill-long ---------------------------------------------------------------
# cmd/cowcsi's TestKillRandom (kill -9 of the real binary at random moments)
# at length: KILL_TRIALS trials instead of the 30 `make test` runs; set
# COWCSI_KILL_SEED to repeat a run, COWCSI_KILL_TRANSPORT=on|off to force a
# FUSE transport, COWCSI_KILL_KEEPGOING=1 to go on after a failed trial.
KILL_TRIALS ?= 300
.PHONY: kill-long
kill-long: deps
	bash test/fuse-guard.sh run 150 env COWCSI_KILL_TRIALS=$(KILL_TRIALS) $(GO) test -race -count=1 -timeout 140m -v -run '^TestKillRandom$$' ./cmd/cowcsi/
