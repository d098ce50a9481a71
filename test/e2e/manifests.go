package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

// renderDeploy runs `kubectl kustomize deploy/` with the pinned kubectl, as
// `kubectl apply -k deploy/` would.
func renderDeploy(kubectl, repoRoot string) ([]*unstructured.Unstructured, error) {
	cmd := exec.Command(kubectl, "kustomize", filepath.Join(repoRoot, "deploy"))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("kubectl kustomize deploy/: %v: %s", err, stderr.String())
	}
	return decodeObjects(out)
}

// readObjects decodes every YAML file in dir.
func readObjects(dir string) ([]*unstructured.Unstructured, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		return nil, err
	}
	sort.Strings(files)
	var objs []*unstructured.Unstructured
	for _, f := range files {
		if filepath.Base(f) == "kustomization.yaml" {
			continue
		}
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		o, err := decodeObjects(data)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		objs = append(objs, o...)
	}
	return objs, nil
}

func decodeObjects(data []byte) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	var objs []*unstructured.Unstructured
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return objs, nil
			}
			return nil, err
		}
		if len(m) == 0 {
			continue
		}
		objs = append(objs, &unstructured.Unstructured{Object: m})
	}
}

// findObject returns the object of that kind and name.
func findObject(objs []*unstructured.Unstructured, kind, name string) (*unstructured.Unstructured, error) {
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			return o, nil
		}
	}
	return nil, fmt.Errorf("deploy/ has no %s %s", kind, name)
}

func toTyped(o *unstructured.Unstructured, into any) error {
	return runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, into)
}

// podRun is how the harness runs one container of a pod template as a local
// process: its args and env as the kubelet would give them, with the host
// paths of its volumes moved under a node's root directory.
type podRun struct {
	spec     corev1.PodSpec
	fields   map[string]string // fieldRef values: spec.nodeName, metadata.name, ...
	hostRoot string            // host paths move under here; "" keeps them
}

// keptHostPaths are the host paths a container sees unchanged: devices.
var keptHostPaths = map[string]bool{"/dev": true, "/sys": true, "/proc": true}

func (r *podRun) container(name string) (*corev1.Container, error) {
	for i := range r.spec.Containers {
		if r.spec.Containers[i].Name == name {
			return &r.spec.Containers[i], nil
		}
	}
	return nil, fmt.Errorf("the pod template has no container %q", name)
}

// hostPath maps a path inside the container to the path the harness uses.
func (r *podRun) hostPath(c *corev1.Container, p string) string {
	best := ""
	var target string
	for _, m := range c.VolumeMounts {
		if (p == m.MountPath || strings.HasPrefix(p, strings.TrimSuffix(m.MountPath, "/")+"/")) && len(m.MountPath) > len(best) {
			for _, v := range r.spec.Volumes {
				if v.Name == m.Name && v.HostPath != nil {
					best = m.MountPath
					target = v.HostPath.Path
				}
			}
		}
	}
	if best == "" {
		return p
	}
	host := filepath.Join(target, strings.TrimPrefix(p, best))
	if r.hostRoot == "" || keptHostPaths[target] {
		return host
	}
	return filepath.Join(r.hostRoot, host)
}

// HostDirs returns the host directories of the pod's hostPath volumes, as
// the harness places them; the kubelet would create DirectoryOrCreate ones.
func (r *podRun) hostDirs() []string {
	var out []string
	for _, v := range r.spec.Volumes {
		if v.HostPath == nil || keptHostPaths[v.HostPath.Path] {
			continue
		}
		out = append(out, filepath.Join(r.hostRoot, v.HostPath.Path))
	}
	return out
}

var envRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// env returns the container's environment, fieldRefs resolved.
func (r *podRun) env(c *corev1.Container) (map[string]string, error) {
	env := map[string]string{}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = envRef.ReplaceAllStringFunc(e.Value, func(s string) string {
				if v, ok := env[s[2:len(s)-1]]; ok {
					return v
				}
				return s
			})
		case e.ValueFrom.FieldRef != nil:
			v, ok := r.fields[e.ValueFrom.FieldRef.FieldPath]
			if !ok {
				return nil, fmt.Errorf("container %s: env %s: no value for field %s", c.Name, e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
			env[e.Name] = v
		default:
			return nil, fmt.Errorf("container %s: env %s: only values and fieldRefs are supported", c.Name, e.Name)
		}
	}
	return env, nil
}

// args returns the container's args with $(VAR) expanded from its env, as
// the kubelet does, and every path that lies in a volume mount moved to
// where the harness keeps that host path.
func (r *podRun) args(name string) (args []string, env map[string]string, err error) {
	c, err := r.container(name)
	if err != nil {
		return nil, nil, err
	}
	env, err = r.env(c)
	if err != nil {
		return nil, nil, err
	}
	expand := func(s string) string {
		s = envRef.ReplaceAllStringFunc(s, func(m string) string {
			if v, ok := env[m[2:len(m)-1]]; ok {
				return v
			}
			return m
		})
		return r.mapPaths(c, s)
	}
	for _, a := range append(append([]string{}, c.Command...), c.Args...) {
		if v := os.Getenv("COWCSI_E2E_V"); v != "" && strings.HasPrefix(a, "--v=") {
			a = "--v=" + v // more log detail for debugging
		}
		// To measure what the upstream defaults cost (docs/BENCHMARKS.md).
		if os.Getenv("COWCSI_E2E_DEFAULT_QPS") != "" && (strings.HasPrefix(a, "--kube-api-qps=") || strings.HasPrefix(a, "--kube-api-burst=")) {
			continue
		}
		args = append(args, expand(a))
	}
	for k, v := range env {
		env[k] = r.mapPaths(c, v)
	}
	return args, env, nil
}

// mapPaths rewrites the path in "--flag=/path", "/path" or
// "unix:///path" forms.
func (r *podRun) mapPaths(c *corev1.Container, s string) string {
	prefix, value := "", s
	if i := strings.Index(s, "="); strings.HasPrefix(s, "-") && i > 0 {
		prefix, value = s[:i+1], s[i+1:]
	}
	scheme := ""
	if strings.HasPrefix(value, "unix://") {
		scheme, value = "unix://", strings.TrimPrefix(value, "unix://")
	}
	if !strings.HasPrefix(value, "/") {
		return s
	}
	return prefix + scheme + r.hostPath(c, value)
}

// daemonSetRun prepares to run the DaemonSet's pod as it would run on node,
// in the pod the DaemonSet controller made for it.
func daemonSetRun(ds *appsv1.DaemonSet, podName, nodeName, hostRoot string) *podRun {
	return &podRun{
		spec: *ds.Spec.Template.Spec.DeepCopy(),
		fields: map[string]string{
			"spec.nodeName":      nodeName,
			"metadata.name":      podName,
			"metadata.namespace": ds.Namespace,
		},
		hostRoot: hostRoot,
	}
}
