package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	snapclient "github.com/kubernetes-csi/external-snapshotter/client/v8/clientset/versioned"
	appsv1 "k8s.io/api/apps/v1"
	authv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// The controllers of kube-controller-manager the tests need: the PV binder
// (binds PVCs, asks external provisioners for WaitForFirstConsumer claims
// with a selected node), the expander (hands CSI resizes to csi-resizer),
// protection finalizers, DaemonSet pods for the node plugin, namespaces, GC.
var kcmControllers = []string{
	"persistentvolume-binder-controller",
	"persistentvolume-expander-controller",
	"persistentvolumeclaim-protection-controller",
	"persistentvolume-protection-controller",
	"daemonset-controller",
	"namespace-controller",
	"garbage-collector-controller",
	"serviceaccount-controller",
}

// cluster is a Kubernetes control plane of local processes.
type cluster struct {
	dir     string
	logDir  string
	bins    *binaries
	pki     *pki
	cleanup cleanups
	procs   []*process

	server   string // https://127.0.0.1:port
	admin    *rest.Config
	kube     kubernetes.Interface
	snap     snapclient.Interface
	dyn      dynamic.Interface
	mapper   *restmapper.DeferredDiscoveryRESTMapper
	manifest []*unstructured.Unstructured // deploy/, rendered
	nodes    []*node
}

// startCluster brings up etcd, kube-apiserver and kube-controller-manager,
// installs the snapshot CRDs, applies deploy/ (server-side dry run of every
// object first, then for real) and starts snapshot-controller.
func startCluster(ctx context.Context, dir string, bins *binaries) (c *cluster, err error) {
	c = &cluster{dir: dir, logDir: filepath.Join(dir, "logs"), bins: bins}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w%s", err, c.logHint())
			_ = c.stop()
		}
	}()
	if err := os.MkdirAll(c.logDir, 0o755); err != nil {
		return c, err
	}
	if c.pki, err = newPKI(filepath.Join(dir, "pki")); err != nil {
		return c, err
	}
	etcdURL, err := c.startEtcd(ctx)
	if err != nil {
		return c, err
	}
	if err := c.startAPIServer(ctx, etcdURL); err != nil {
		return c, err
	}
	if err := c.startControllerManager(); err != nil {
		return c, err
	}
	if err := c.installCRDs(ctx); err != nil {
		return c, err
	}
	if err := c.applyDeploy(ctx); err != nil {
		return c, err
	}
	if err := c.startSnapshotController(ctx); err != nil {
		return c, err
	}
	return c, nil
}

func (c *cluster) start(name, bin string, args, env []string) (*process, error) {
	p, err := startProcess(c.logDir, name, bin, args, env)
	if err != nil {
		return nil, err
	}
	c.procs = append(c.procs, p)
	c.cleanup.add(func() error {
		err := p.stop(15 * time.Second)
		if err != nil && !p.mustStopCleanly {
			// Upstream programs: kube-apiserver's graceful termination
			// sometimes outlasts the grace; not what is tested here.
			fmt.Fprintf(os.Stderr, "e2e: teardown (not a failure): %v\n", err)
			return nil
		}
		return err
	})
	return p, nil
}

// stop tears down everything in reverse order of creation.
func (c *cluster) stop() error { return c.cleanup.run() }

// dead returns an error naming any cluster process that has exited.
func (c *cluster) dead() error {
	for _, p := range c.procs {
		if done, err := p.exited(); done {
			return permanentError{fmt.Errorf("%s exited (%v); log %s:\n%s", p.name, err, p.logPath, p.tail(20))}
		}
	}
	return nil
}

func (c *cluster) logHint() string { return fmt.Sprintf(" (process logs in %s)", c.logDir) }

// startEtcd runs etcd on a tmpfs: the tests measure the CSI stack, not the
// disk's fsync latency, and the machine's disk is shared with other work.
func (c *cluster) startEtcd(ctx context.Context) (string, error) {
	dataDir := filepath.Join(c.dir, "etcd")
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return "", err
	}
	if err := syscall.Mount("tmpfs", dataDir, "tmpfs", 0, "size=512m,mode=0700"); err != nil {
		return "", fmt.Errorf("tmpfs for etcd: %w", err)
	}
	c.cleanup.add(func() error { return syscall.Unmount(dataDir, syscall.MNT_DETACH) })
	clientPort, err := freePort()
	if err != nil {
		return "", err
	}
	peerPort, err := freePort()
	if err != nil {
		return "", err
	}
	clientURL := fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	_, err = c.start("etcd", c.bins.etcd, []string{
		"--name=e2e",
		"--data-dir=" + filepath.Join(dataDir, "data"),
		"--listen-client-urls=" + clientURL,
		"--advertise-client-urls=" + clientURL,
		"--listen-peer-urls=" + peerURL,
		"--initial-advertise-peer-urls=" + peerURL,
		"--initial-cluster=e2e=" + peerURL,
		"--log-level=warn",
	}, []string{"ETCD_UNSUPPORTED_ARCH="})
	if err != nil {
		return "", err
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return clientURL, waitFor(wctx, 100*time.Millisecond, "etcd", func() (bool, error) {
		if err := c.dead(); err != nil {
			return false, err
		}
		resp, err := http.Get(clientURL + "/health")
		if err != nil {
			return false, err
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
}

// startAPIServer runs kube-apiserver against etcdURL, waits until it is
// ready and makes the admin clients.
func (c *cluster) startAPIServer(ctx context.Context, etcdURL string) error {
	port, err := freePort()
	if err != nil {
		return err
	}
	c.server = fmt.Sprintf("https://127.0.0.1:%d", port)
	certDir := filepath.Join(c.dir, "apiserver")
	if err := os.MkdirAll(certDir, 0o700); err != nil {
		return err
	}
	_, err = c.start("kube-apiserver", c.bins.tool("kube-apiserver"), []string{
		"--etcd-servers=" + etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port=" + strconv.Itoa(port),
		"--cert-dir=" + certDir,
		"--tls-cert-file=" + c.pki.CertFile,
		"--tls-private-key-file=" + c.pki.KeyFile,
		"--token-auth-file=" + c.pki.TokenFile,
		"--authorization-mode=RBAC",
		"--service-account-issuer=" + c.server,
		"--service-account-key-file=" + c.pki.SAPubFile,
		"--service-account-signing-key-file=" + c.pki.SAKeyFile,
		"--service-cluster-ip-range=10.0.0.0/24",
		"--allow-privileged=true",
		// The kubernetes Service cannot point at a loopback address.
		"--endpoint-reconciler-type=none",
		"--profiling=false",
		"--v=1",
	}, nil)
	if err != nil {
		return err
	}
	c.admin = &rest.Config{
		Host:            c.server,
		BearerToken:     c.pki.AdminToken,
		TLSClientConfig: rest.TLSClientConfig{CAData: c.pki.caPEM},
		QPS:             200,
		Burst:           400,
	}
	wctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	if err := c.waitReadyz(wctx); err != nil {
		return err
	}
	if err := c.makeClients(); err != nil {
		return err
	}
	// The system namespaces appear shortly after /readyz.
	return waitFor(wctx, 100*time.Millisecond, "namespace kube-system", func() (bool, error) {
		_, err := c.kube.CoreV1().Namespaces().Get(wctx, "kube-system", metav1.GetOptions{})
		return err == nil, err
	})
}

// waitReadyz polls the apiserver's /readyz as the admin until it answers
// 200.
func (c *cluster) waitReadyz(ctx context.Context) error {
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(c.pki.caPEM)
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}, Timeout: 5 * time.Second}
	return waitFor(ctx, 200*time.Millisecond, "kube-apiserver /readyz", func() (bool, error) {
		if err := c.dead(); err != nil {
			return false, err
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, c.server+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+c.pki.AdminToken)
		resp, err := hc.Do(req)
		if err != nil {
			return false, err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return false, fmt.Errorf("/readyz: %s", resp.Status)
		}
		return true, nil
	})
}

// makeClients makes the admin's typed, snapshot and dynamic clients and
// the REST mapper.
func (c *cluster) makeClients() error {
	var err error
	if c.kube, err = kubernetes.NewForConfig(c.admin); err != nil {
		return err
	}
	if c.snap, err = snapclient.NewForConfig(c.admin); err != nil {
		return err
	}
	if c.dyn, err = dynamic.NewForConfig(c.admin); err != nil {
		return err
	}
	dc, err := discovery.NewDiscoveryClientForConfig(c.admin)
	if err != nil {
		return err
	}
	c.mapper = restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	return nil
}

// writeKubeconfig writes a kubeconfig for the apiserver with a bearer token.
func (c *cluster) writeKubeconfig(path, user, token string) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["e2e"] = &clientcmdapi.Cluster{Server: c.server, CertificateAuthorityData: c.pki.caPEM}
	cfg.AuthInfos[user] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["e2e"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: user}
	cfg.CurrentContext = "e2e"
	return clientcmd.WriteToFile(*cfg, path)
}

func (c *cluster) startControllerManager() error {
	kubeconfig := filepath.Join(c.dir, "admin.kubeconfig")
	if err := c.writeKubeconfig(kubeconfig, "admin", c.pki.AdminToken); err != nil {
		return err
	}
	_, err := c.start("kube-controller-manager", c.bins.tool("kube-controller-manager"), []string{
		"--kubeconfig=" + kubeconfig,
		"--leader-elect=false",
		"--controllers=" + strings.Join(kcmControllers, ","),
		"--bind-address=127.0.0.1",
		"--secure-port=0",
		"--profiling=false",
		"--v=1",
	}, nil)
	return err
}

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// installCRDs creates the snapshot CRDs of the pinned external-snapshotter
// client module and waits until they serve.
func (c *cluster) installCRDs(ctx context.Context) error {
	crds, err := readObjects(c.bins.crdDir)
	if err != nil {
		return err
	}
	for _, crd := range crds {
		if _, err := c.dyn.Resource(crdGVR).Create(ctx, crd, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("CRD %s: %w", crd.GetName(), err)
		}
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, crd := range crds {
		err := waitFor(wctx, 50*time.Millisecond, "CRD "+crd.GetName(), func() (bool, error) {
			o, err := c.dyn.Resource(crdGVR).Get(wctx, crd.GetName(), metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			conds, _, _ := unstructured.NestedSlice(o.Object, "status", "conditions")
			for _, cd := range conds {
				m, _ := cd.(map[string]any)
				if m["type"] == "Established" && m["status"] == "True" {
					return true, nil
				}
			}
			return false, nil
		})
		if err != nil {
			return err
		}
	}
	c.mapper.Reset()
	return nil
}

// applyDeploy renders deploy/ and applies every object server-side: first
// as a dry run of all of them, which is what the issue asks to pass, then
// for real. Nothing of the DaemonSet or the Deployment runs by itself here:
// the harness starts their containers as processes.
func (c *cluster) applyDeploy(ctx context.Context) error {
	objs, err := renderDeploy(c.bins.tool("kubectl"), c.bins.repoRoot)
	if err != nil {
		return err
	}
	c.manifest = objs
	for _, dry := range []bool{true, false} {
		for _, o := range objs {
			if err := c.apply(ctx, o, dry); err != nil {
				return err
			}
		}
	}
	return nil
}

// apply is `kubectl apply --server-side [--dry-run=server]` of one object.
func (c *cluster) apply(ctx context.Context, o *unstructured.Unstructured, dryRun bool) error {
	gvk := o.GroupVersionKind()
	m, err := c.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return fmt.Errorf("%s %s: %w", gvk.Kind, o.GetName(), err)
	}
	var ri dynamic.ResourceInterface = c.dyn.Resource(m.Resource)
	if o.GetNamespace() != "" {
		ri = c.dyn.Resource(m.Resource).Namespace(o.GetNamespace())
	}
	opts := metav1.ApplyOptions{FieldManager: "cowcsi-e2e", Force: true}
	what := "apply"
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
		what = "server-side dry-run apply"
	}
	if _, err := ri.Apply(ctx, o.GetName(), o, opts); err != nil {
		return fmt.Errorf("%s of %s %s/%s: %w", what, gvk.Kind, o.GetNamespace(), o.GetName(), err)
	}
	return nil
}

// token mints a token for a service account through the TokenRequest API,
// bound to a pod when pod is set, as the kubelet does for a projected
// service account token.
func (c *cluster) token(ctx context.Context, ns, sa string, pod *types.UID, podName string) (string, error) {
	req := &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{ExpirationSeconds: ptr(int64(24 * 3600))}}
	if pod != nil {
		req.Spec.BoundObjectRef = &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: podName, UID: *pod}
	}
	tr, err := c.kube.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("TokenRequest for %s/%s: %w", ns, sa, err)
	}
	return tr.Status.Token, nil
}

// startSnapshotController runs the container of deploy/'s snapshot-controller
// Deployment with a token of its service account.
func (c *cluster) startSnapshotController(ctx context.Context) error {
	o, err := findObject(c.manifest, "Deployment", "snapshot-controller")
	if err != nil {
		return err
	}
	var dep appsv1.Deployment
	if err := toTyped(o, &dep); err != nil {
		return err
	}
	run := &podRun{spec: dep.Spec.Template.Spec, fields: map[string]string{
		"metadata.namespace": dep.Namespace,
		"metadata.name":      "snapshot-controller-e2e",
	}}
	args, env, err := run.args("snapshot-controller")
	if err != nil {
		return err
	}
	tok, err := c.token(ctx, dep.Namespace, dep.Spec.Template.Spec.ServiceAccountName, nil, "")
	if err != nil {
		return err
	}
	kubeconfig := filepath.Join(c.dir, "snapshot-controller.kubeconfig")
	if err := c.writeKubeconfig(kubeconfig, "snapshot-controller", tok); err != nil {
		return err
	}
	_, err = c.start("snapshot-controller", c.bins.tool("snapshot-controller"), append(args, "--kubeconfig="+kubeconfig), envList(env))
	return err
}

func envList(env map[string]string) []string {
	var out []string
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	return out
}

func ptr[T any](v T) *T { return &v }
