# cowcsi node plugin image: `make image` (needs a Docker engine; none runs
# on the development machines, so this file is kept minimal and conventional).
#
# Build stage: a static binary, no cgo.
FROM golang:1.26-trixie AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/cowcsi ./cmd/cowcsi

# Runtime: what the node plugin calls out to: mkfs/resize2fs/e2fsck
# (e2fsprogs), mkfs.xfs/xfs_growfs (xfsprogs), mount/umount/blkid/losetup
# (util-linux, mount), fusermount3 (fuse3).
FROM debian:trixie-slim
RUN apt-get update \
	&& apt-get install -y --no-install-recommends e2fsprogs xfsprogs util-linux mount fuse3 \
	&& rm -rf /var/lib/apt/lists/*
COPY --from=build /out/cowcsi /usr/local/bin/cowcsi
ENTRYPOINT ["/usr/local/bin/cowcsi"]
