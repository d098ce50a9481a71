package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

const (
	driverName  = "cowcsi.io"
	topologyKey = "topology.cowcsi.io/node"
	// The pod template's host paths, as deploy/daemonset.yaml has them.
	kubeletDir = "/var/lib/kubelet"
)

// node is one Kubernetes node of the test cluster: no kubelet runs, but the
// DaemonSet's containers do, as processes, with their host paths under
// root; the harness does the kubelet's CSI calls.
type node struct {
	c      *cluster
	name   string
	root   string // host paths of the DaemonSet move under here
	run    *podRun
	pod    *corev1.Pod
	cowcsi *process
	procs  []*process
	csi    *grpc.ClientConn
	nodeID string
}

func (n *node) id() csi.NodeClient               { return csi.NewNodeClient(n.csi) }
func (n *node) controller() csi.ControllerClient { return csi.NewControllerClient(n.csi) }

// hostPath is where the harness keeps host path p of this node.
func (n *node) hostPath(p string) string { return filepath.Join(n.root, p) }

// socket is the driver's socket, where the kubelet finds it.
func (n *node) socket() string { return n.hostPath(kubeletDir + "/plugins/cowcsi.io/csi.sock") }

// addNode starts a node: cowcsi as the DaemonSet runs it; then what the
// kubelet and node-driver-registrar would publish (the Node with the
// driver's topology label, the CSINode); then, in the pod the DaemonSet
// controller made for this node, the sidecars with tokens of the pod's
// service account.
func (c *cluster) addNode(ctx context.Context, name string) (n *node, err error) {
	n = &node{c: c, name: name, root: filepath.Join(c.dir, "nodes", name)}
	o, err := findObject(c.manifest, "DaemonSet", "cowcsi-node")
	if err != nil {
		return nil, err
	}
	var ds appsv1.DaemonSet
	if err := toTyped(o, &ds); err != nil {
		return nil, err
	}
	// cowcsi needs no API access and no pod: start it first, as the kubelet
	// registers the driver before anything can use it.
	n.run = daemonSetRun(&ds, "", name, n.root)
	for _, d := range append(n.run.hostDirs(), n.hostPath(kubeletDir+"/pods")) {
		if err := os.MkdirAll(d, 0o750); err != nil {
			return nil, err
		}
	}
	args, env, err := n.run.args("cowcsi")
	if err != nil {
		return nil, err
	}
	if n.cowcsi, err = n.start("cowcsi", c.bins.cowcsi, args, env, ""); err != nil {
		return nil, err
	}
	n.cowcsi.mustStopCleanly = true
	if err := n.connect(ctx); err != nil {
		return nil, err
	}
	if err := n.register(ctx); err != nil {
		return nil, err
	}
	pod, err := n.waitDaemonPod(ctx, &ds)
	if err != nil {
		return nil, err
	}
	n.pod = pod
	n.run = daemonSetRun(&ds, pod.Name, name, n.root)
	tok, err := c.token(ctx, pod.Namespace, pod.Spec.ServiceAccountName, &pod.UID, pod.Name)
	if err != nil {
		return nil, err
	}
	kubeconfig := filepath.Join(n.root, "sidecars.kubeconfig")
	if err := c.writeKubeconfig(kubeconfig, pod.Spec.ServiceAccountName, tok); err != nil {
		return nil, err
	}
	for _, sc := range []struct{ container, tool string }{
		{"csi-provisioner", "csi-provisioner"},
		{"csi-snapshotter", "csi-snapshotter"},
		{"csi-resizer", "csi-resizer"},
	} {
		args, env, err := n.run.args(sc.container)
		if err != nil {
			return nil, err
		}
		// In a pod the sidecars find the apiserver through the in-cluster
		// config; here they get a kubeconfig with the same token.
		if _, err := n.start(sc.container, c.bins.tool(sc.tool), append(args, "--kubeconfig="+kubeconfig), env, pod.Name); err != nil {
			return nil, err
		}
	}
	c.nodes = append(c.nodes, n)
	return n, nil
}

// start runs one container of the node's pod. With a hostname, it runs in a
// UTS namespace of its own with that hostname, as in a pod: leader election
// takes the hostname as the candidate's identity, and two nodes' sidecars on
// one machine would otherwise both "hold" the lease.
func (n *node) start(container, bin string, args []string, env map[string]string, hostname string) (*process, error) {
	if hostname != "" {
		args = append([]string{"--uts", "--", "sh", "-c", `hostname "$1" && shift && exec "$@"`, "sh", hostname, bin}, args...)
		bin = "unshare"
	}
	p, err := n.c.start(n.name+"-"+container, bin, args, envList(env))
	if err != nil {
		return nil, err
	}
	n.procs = append(n.procs, p)
	return p, nil
}

// connect waits for the driver's socket and dials it.
func (n *node) connect(ctx context.Context) error {
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	err := waitFor(wctx, 50*time.Millisecond, "cowcsi socket on "+n.name, func() (bool, error) {
		if done, err := n.cowcsi.exited(); done {
			return false, permanentError{fmt.Errorf("cowcsi exited: %v\n%s", err, n.cowcsi.tail(20))}
		}
		_, err := os.Stat(n.socket())
		return err == nil, nil
	})
	if err != nil {
		return err
	}
	conn, err := grpc.NewClient("unix://"+n.socket(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	n.csi = conn
	n.c.cleanup.add(conn.Close)
	// The driver answers Unavailable until it has recovered its state; the
	// sidecars wait for Probe to say ready, and so does the harness.
	return waitFor(wctx, 50*time.Millisecond, "cowcsi Probe on "+n.name, func() (bool, error) {
		if done, err := n.cowcsi.exited(); done {
			return false, permanentError{fmt.Errorf("cowcsi exited: %v\n%s", err, n.cowcsi.tail(20))}
		}
		resp, err := csi.NewIdentityClient(conn).Probe(wctx, &csi.ProbeRequest{})
		if err != nil {
			return false, err
		}
		return resp.GetReady() == nil || resp.GetReady().GetValue(), nil
	})
}

// register does what the kubelet does when node-driver-registrar reports the
// driver: NodeGetInfo, then the Node's topology labels, the driver's node ID
// annotation and the CSINode object. The Node itself is the kubelet's.
func (n *node) register(ctx context.Context) error {
	info, err := n.id().NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil {
		return fmt.Errorf("NodeGetInfo on %s: %w", n.name, err)
	}
	n.nodeID = info.GetNodeId()
	labels := map[string]string{"kubernetes.io/hostname": n.name, "kubernetes.io/os": "linux"}
	var keys []string
	for k, v := range info.GetAccessibleTopology().GetSegments() {
		labels[k] = v
		keys = append(keys, k)
	}
	ids, _ := json.Marshal(map[string]string{driverName: n.nodeID})
	kn, err := n.c.kube.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name:        n.name,
			Labels:      labels,
			Annotations: map[string]string{"csi.volume.kubernetes.io/nodeid": string(ids)},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	kn.Status = corev1.NodeStatus{
		Conditions: []corev1.NodeCondition{{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
			Message: "the e2e harness plays the kubelet", LastHeartbeatTime: metav1.Now(), LastTransitionTime: metav1.Now(),
		}},
		Capacity:    corev1.ResourceList{corev1.ResourcePods: resource.MustParse("110")},
		Allocatable: corev1.ResourceList{corev1.ResourcePods: resource.MustParse("110")},
	}
	if kn, err = n.c.kube.CoreV1().Nodes().UpdateStatus(ctx, kn, metav1.UpdateOptions{}); err != nil {
		return err
	}
	drv := storagev1.CSINodeDriver{Name: driverName, NodeID: n.nodeID, TopologyKeys: keys}
	if max := info.GetMaxVolumesPerNode(); max > 0 {
		drv.Allocatable = &storagev1.VolumeNodeResources{Count: ptr(int32(max))}
	}
	_, err = n.c.kube.StorageV1().CSINodes().Create(ctx, &storagev1.CSINode{
		ObjectMeta: metav1.ObjectMeta{
			Name:            n.name,
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: n.name, UID: kn.UID}},
		},
		Spec: storagev1.CSINodeSpec{Drivers: []storagev1.CSINodeDriver{drv}},
	}, metav1.CreateOptions{})
	return err
}

// waitDaemonPod waits for the pod kube-controller-manager's DaemonSet
// controller makes for this node. No scheduler or kubelet runs, so it stays
// Pending; it is there for the sidecars' identity (a token bound to it) and
// for the owner of the CSIStorageCapacity objects (pod -> DaemonSet).
func (n *node) waitDaemonPod(ctx context.Context, ds *appsv1.DaemonSet) (*corev1.Pod, error) {
	var found *corev1.Pod
	wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	sel := metav1.FormatLabelSelector(ds.Spec.Selector)
	err := waitFor(wctx, 100*time.Millisecond, "DaemonSet pod for "+n.name, func() (bool, error) {
		pods, err := n.c.kube.CoreV1().Pods(ds.Namespace).List(wctx, metav1.ListOptions{LabelSelector: sel})
		if err != nil {
			return false, err
		}
		for i := range pods.Items {
			if podNode(&pods.Items[i]) == n.name {
				found = &pods.Items[i]
				return true, nil
			}
		}
		return false, nil
	})
	return found, err
}

// podNode returns the node a DaemonSet pod is for: its nodeName, or the
// metadata.name term of the node affinity the DaemonSet controller sets.
func podNode(p *corev1.Pod) string {
	if p.Spec.NodeName != "" {
		return p.Spec.NodeName
	}
	a := p.Spec.Affinity
	if a == nil || a.NodeAffinity == nil || a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution == nil {
		return ""
	}
	for _, t := range a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms {
		for _, f := range t.MatchFields {
			if f.Key == "metadata.name" && len(f.Values) == 1 {
				return f.Values[0]
			}
		}
	}
	return ""
}

// stagingPath is the kubelet's global mount path for a CSI volume:
// plugins/kubernetes.io/csi/<driver>/<sha256(volumeHandle)>/globalmount.
func (n *node) stagingPath(volumeHandle string) string {
	sum := sha256.Sum256([]byte(volumeHandle))
	return n.hostPath(fmt.Sprintf("%s/plugins/kubernetes.io/csi/%s/%x/globalmount", kubeletDir, driverName, sum))
}

// targetPath is the kubelet's per-pod mount path for a CSI volume.
func (n *node) targetPath(podUID, pvName string) string {
	return n.hostPath(fmt.Sprintf("%s/pods/%s/volumes/kubernetes.io~csi/%s/mount", kubeletDir, podUID, pvName))
}

// capability is the volume capability the kubelet sends for a PV. The driver
// offers SINGLE_NODE_MULTI_WRITER, so ReadWriteOnce maps to it, as in the
// kubelet.
func capability(pv *corev1.PersistentVolume) *csi.VolumeCapability {
	mode := csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER
	for _, m := range pv.Spec.AccessModes {
		if m == corev1.ReadWriteOncePod {
			mode = csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER
		}
	}
	vc := &csi.VolumeCapability{AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode}}
	if pv.Spec.VolumeMode != nil && *pv.Spec.VolumeMode == corev1.PersistentVolumeBlock {
		vc.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
	} else {
		vc.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{
			FsType: pv.Spec.CSI.FSType, MountFlags: pv.Spec.MountOptions,
		}}
	}
	return vc
}

// mounted is a volume the harness has staged and published, as the kubelet
// does for a pod that uses a PVC.
type mounted struct {
	n       *node
	pv      *corev1.PersistentVolume
	staging string
	target  string // the directory the pod would see
}

// publish stages and publishes pv for a pod that does not otherwise exist.
// The caller unpublishes (cleanup) before the PVC goes.
func (n *node) publish(ctx context.Context, pv *corev1.PersistentVolume, podUID string) (*mounted, error) {
	if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != driverName {
		return nil, fmt.Errorf("PV %s is not a %s volume", pv.Name, driverName)
	}
	m := &mounted{n: n, pv: pv, staging: n.stagingPath(pv.Spec.CSI.VolumeHandle), target: n.targetPath(podUID, pv.Name)}
	if err := os.MkdirAll(m.staging, 0o750); err != nil {
		return nil, err
	}
	vc := capability(pv)
	if _, err := n.id().NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
		VolumeId: pv.Spec.CSI.VolumeHandle, StagingTargetPath: m.staging,
		VolumeCapability: vc, VolumeContext: pv.Spec.CSI.VolumeAttributes,
	}); err != nil {
		return nil, fmt.Errorf("NodeStageVolume %s on %s: %w", pv.Spec.CSI.VolumeHandle, n.name, err)
	}
	// The kubelet makes the parent of the target path; the driver the rest.
	if err := os.MkdirAll(filepath.Dir(m.target), 0o750); err != nil {
		return m, err
	}
	if _, err := n.id().NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
		VolumeId: pv.Spec.CSI.VolumeHandle, StagingTargetPath: m.staging, TargetPath: m.target,
		VolumeCapability: vc, VolumeContext: pv.Spec.CSI.VolumeAttributes,
	}); err != nil {
		return m, fmt.Errorf("NodePublishVolume %s on %s: %w", pv.Spec.CSI.VolumeHandle, n.name, err)
	}
	return m, nil
}

// unpublish undoes publish: NodeUnpublish, NodeUnstage, and the directories
// the kubelet made.
func (m *mounted) unpublish(ctx context.Context) error {
	id := m.pv.Spec.CSI.VolumeHandle
	if _, err := m.n.id().NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: m.target}); err != nil {
		return fmt.Errorf("NodeUnpublishVolume %s: %w", id, err)
	}
	if _, err := m.n.id().NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: id, StagingTargetPath: m.staging}); err != nil {
		return fmt.Errorf("NodeUnstageVolume %s: %w", id, err)
	}
	podDir := filepath.Dir(filepath.Dir(filepath.Dir(filepath.Dir(m.target))))
	if filepath.Base(filepath.Dir(podDir)) == "pods" {
		_ = os.RemoveAll(podDir)
	}
	_ = os.RemoveAll(filepath.Dir(m.staging))
	return nil
}

// expand is the kubelet's part of an expansion: NodeExpandVolume on the
// volume's node, then the PVC's status catches up with its request.
func (m *mounted) expand(ctx context.Context, size int64) (*csi.NodeExpandVolumeResponse, error) {
	return m.n.id().NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{
		VolumeId: m.pv.Spec.CSI.VolumeHandle, VolumePath: m.target, StagingTargetPath: m.staging,
		CapacityRange: &csi.CapacityRange{RequiredBytes: size}, VolumeCapability: capability(m.pv),
	})
}

// hasSnapshot asks this node's driver whether it holds the snapshot.
func (n *node) hasSnapshot(ctx context.Context, handle string) (bool, error) {
	resp, err := n.controller().ListSnapshots(ctx, &csi.ListSnapshotsRequest{SnapshotId: handle})
	if err != nil {
		return false, err
	}
	return len(resp.GetEntries()) > 0, nil
}

// hasVolume asks this node's driver whether it holds the volume.
func (n *node) hasVolume(ctx context.Context, handle string) (bool, error) {
	resp, err := n.controller().ListVolumes(ctx, &csi.ListVolumesRequest{})
	if err != nil {
		return false, err
	}
	for _, e := range resp.GetEntries() {
		if e.GetVolume().GetVolumeId() == handle {
			return true, nil
		}
	}
	return false, nil
}

// log returns the log of one of this node's containers.
func (n *node) log(container string) string {
	data, _ := os.ReadFile(n.logPath(container))
	return string(data)
}

func (n *node) logPath(container string) string {
	return filepath.Join(n.c.logDir, n.name+"-"+container+".log")
}
