package k8smode

import (
	"context"
	"fmt"
	"sync"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/cowcsi/cowcsi/cmd/cowbench/internal/bench"
)

const (
	writerDevice = "/dev/cowbench"
	writerDir    = "/data"
	writtenFlag  = "/tmp/written"
)

func writerName(cl *claim) string { return cl.name + "-writer" }

// createWriter creates the pod that writes the data into a source claim:
// dd of random data with fsync, then it stays running, Ready, so that the
// snapshots are of a volume in use, as with an application.
func (r *runner) createWriter(ctx context.Context, cl *claim) error {
	mib := (r.cfg.Write + 1<<20 - 1) >> 20
	target := writerDevice
	if r.cfg.Access == bench.AccessMount {
		target = writerDir + "/cowbench.data"
	}
	script := fmt.Sprintf("dd if=/dev/urandom of=%s bs=1048576 count=%d conv=fsync && touch %s && exec sleep 86400", target, mib, writtenFlag)
	c := corev1.Container{
		Name: "writer", Image: r.cfg.WriterImage, Command: []string{"sh", "-c", script},
		ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"test", "-f", writtenFlag}}},
			PeriodSeconds: 1},
	}
	if r.cfg.Access == bench.AccessMount {
		c.VolumeMounts = []corev1.VolumeMount{{Name: "data", MountPath: writerDir}}
	} else {
		c.VolumeDevices = []corev1.VolumeDevice{{Name: "data", DevicePath: writerDevice}}
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: writerName(cl), Namespace: r.ns, Labels: map[string]string{createdByLabel: createdBy}},
		Spec: corev1.PodSpec{
			RestartPolicy:                 corev1.RestartPolicyNever,
			NodeName:                      r.cfg.Node, // with --node the scheduler is not needed
			TerminationGracePeriodSeconds: ptr(int64(0)),
			Containers:                    []corev1.Container{c},
			Volumes: []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{
				PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: cl.name}}}},
		},
	}
	if _, err := r.c.kube.CoreV1().Pods(r.ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("writer pod: %w", err)
	}
	cl.pod = true
	return nil
}

// write creates the writer pod of a claim (unless it exists already) and
// returns when the pod has written the data: when it is Ready.
func (r *runner) write(ctx context.Context, cl *claim) error {
	if !cl.pod {
		if err := r.createWriter(ctx, cl); err != nil {
			return err
		}
	}
	_, err := r.t.wait(ctx, "Pod", r.ns+"/"+writerName(cl), r.pods.GetStore(), func(o any) (bool, error) {
		p, ok := o.(*corev1.Pod)
		if !ok {
			return false, nil
		}
		if p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded {
			return false, fmt.Errorf("writer pod %s ended (%s): %s", p.Name, p.Status.Phase, podEnd(p))
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return true, nil
			}
		}
		return false, nil
	}, func(o any) string {
		p, ok := o.(*corev1.Pod)
		if !ok {
			return "?"
		}
		s := "phase " + string(p.Status.Phase)
		for _, cs := range p.Status.ContainerStatuses {
			if w := cs.State.Waiting; w != nil {
				s += "; waiting: " + w.Reason + " " + w.Message
			}
		}
		if ev := r.lastWarning("Pod", p.Name); ev != "" {
			s += "; last warning: " + ev
		}
		return s
	})
	return err
}

func podEnd(p *corev1.Pod) string {
	for _, cs := range p.Status.ContainerStatuses {
		if t := cs.State.Terminated; t != nil {
			return fmt.Sprintf("exit code %d, %s %s", t.ExitCode, t.Reason, t.Message)
		}
	}
	return p.Status.Reason + " " + p.Status.Message
}

// deletePods deletes the writer pods of claims and waits until they are
// gone, so that the claims are no longer in use.
func (r *runner) deletePods(ctx context.Context, claims []*claim) {
	var wg sync.WaitGroup
	for _, cl := range claims {
		if !cl.pod {
			continue
		}
		wg.Go(func() {
			err := r.c.kube.CoreV1().Pods(r.ns).Delete(ctx, writerName(cl), metav1.DeleteOptions{GracePeriodSeconds: ptr(int64(0))})
			if err == nil {
				_, err = r.t.wait(ctx, "Pod", r.ns+"/"+writerName(cl), r.pods.GetStore(), gone, describeAny)
			}
			if err != nil && ctx.Err() == nil {
				r.prog.Printf("warning: writer pod %s: %v", writerName(cl), err)
			}
		})
	}
	wg.Wait()
}
