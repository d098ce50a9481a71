#!/usr/bin/env bash
# Builds the Kubernetes control plane and the CSI sidecars that the e2e tests
# run as local processes, from the versions pinned in test/e2e/tools/go.mod.
#
# The binaries go to a cache outside the repository, keyed on the hash of the
# tools module's go.mod and go.sum, so a second run (or another checkout with
# the same pins) builds nothing:
#
#   $COWCSI_TOOLS_CACHE/k8s-<kubernetes version>-<hash>/bin
#
# COWCSI_TOOLS_CACHE defaults to $HOME/.cache/cowcsi. The last line printed
# is the bin directory; `make e2e-tools` and the tests use it.
#
# kube-apiserver is the long one: about 8 minutes on 2 cores the first time.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tools=$here/tools
cd "$tools"

k8s_version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
hash=$(cat go.mod go.sum | sha256sum | cut -c1-12)
cache=${COWCSI_TOOLS_CACHE:-$HOME/.cache/cowcsi}
bin=$cache/k8s-$k8s_version-$hash/bin
mkdir -p "$bin"

# What kube-apiserver reports as its version; the apiserver derives its
# emulation and compatibility versions from it, and clients log it.
minor=${k8s_version#v1.}
minor=${minor%%.*}
ldflags=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $p.gitVersion=$k8s_version -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done

# name -> package; the order puts the slow builds first.
pkgs=(
	kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver
	kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager
	kubectl=k8s.io/kubernetes/cmd/kubectl
	snapshot-controller=github.com/kubernetes-csi/external-snapshotter/v8/cmd/snapshot-controller
	csi-snapshotter=github.com/kubernetes-csi/external-snapshotter/v8/cmd/csi-snapshotter
	csi-provisioner=github.com/kubernetes-csi/external-provisioner/v6/cmd/csi-provisioner
	csi-resizer=github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer
)

echo "build-tools: k8s.io/kubernetes $k8s_version, cache $bin" >&2
total_start=$SECONDS
for entry in "${pkgs[@]}"; do
	name=${entry%%=*}
	pkg=${entry#*=}
	if [ -x "$bin/$name" ]; then
		echo "build-tools: $name: cached" >&2
		continue
	fi
	echo "build-tools: $name: building $pkg ..." >&2
	start=$SECONDS
	# Build beside the target and rename, so an interrupted build never
	# leaves a binary that the next run would take as done.
	go build -ldflags "$ldflags" -o "$bin/.$name.tmp" "$pkg"
	mv "$bin/.$name.tmp" "$bin/$name"
	echo "build-tools: $name: built in $((SECONDS - start))s" >&2
done
echo "build-tools: done in $((SECONDS - total_start))s" >&2

# The snapshot CRDs ship in the client module; make sure it is downloaded
# and print where, for the tests (COWCSI_SNAPSHOT_CRDS) and the docs.
crds=$(go list -m -f '{{.Dir}}' github.com/kubernetes-csi/external-snapshotter/client/v8)/config/crd
[ -d "$crds" ] || go mod download github.com/kubernetes-csi/external-snapshotter/client/v8
echo "build-tools: snapshot CRDs in $crds" >&2
echo "$bin"
