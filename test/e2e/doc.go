// Package e2e runs cowcsi under the unchanged upstream Kubernetes snapshot
// stack, as local processes on loopback:
//
//   - etcd (Debian's etcd-server), kube-apiserver with RBAC and
//     kube-controller-manager (PV binder and expander, DaemonSet, GC);
//   - snapshot-controller with --enable-distributed-snapshotting;
//   - per node: bin/cowcsi with its own --nodeid and store, csi-provisioner and
//     csi-snapshotter with --node-deployment, and csi-resizer.
//
// The sidecars and snapshot-controller run with the args and env of the
// DaemonSet and Deployment in deploy/ (rendered with kubectl kustomize), and
// with tokens of the service accounts that deploy/ binds its RBAC to, so the
// manifests are what is tested. Host paths of the DaemonSet move under a
// per-node directory, so two nodes share one machine.
//
// The harness plays the parts that have no process here: the kubelet (Node,
// CSINode, NodeStage/NodePublish with the kubelet's path layout,
// NodeExpandVolume) and the scheduler (the selected-node annotation on PVCs).
//
// The binaries are built once from test/e2e/tools (build-tools.sh) into a
// cache outside the repository. Tests need root: they mount, attach loop
// devices and serve FUSE.
package e2e
