package main

import (
	"os"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	"k8s.io/apimachinery/pkg/util/yaml"

	"github.com/cowcsi/cowcsi/driver"
)

// stopMargin is what the grace period must leave after the driver's stop
// and a pending freeze: the process's exit and the kernel's teardown of
// its FUSE connection.
const stopMargin = 5 * time.Second

// TestDeployGracePeriod: the cowcsi container's args in deploy/ are flags
// this binary accepts, and the pod's grace period covers the stop they
// configure (--stop-timeout), a pending freeze (--freeze-timeout) and
// stopMargin, so that the kubelet's SIGKILL never lands in the stop.
func TestDeployGracePeriod(t *testing.T) {
	f, err := os.Open("../../deploy/daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var ds appsv1.DaemonSet
	if err := yaml.NewYAMLOrJSONDecoder(f, 4096).Decode(&ds); err != nil {
		t.Fatal(err)
	}
	spec := ds.Spec.Template.Spec
	var args []string
	for _, c := range spec.Containers {
		if c.Name != "cowcsi" {
			continue
		}
		// $(VAR) as the kubelet expands it; values from the downward
		// API get a stand-in.
		env := map[string]string{}
		for _, e := range c.Env {
			v := e.Value
			if e.ValueFrom != nil {
				v = "node-1"
			}
			env["$("+e.Name+")"] = v
		}
		for _, a := range c.Args {
			for k, v := range env {
				a = strings.ReplaceAll(a, k, v)
			}
			args = append(args, a)
		}
	}
	if args == nil {
		t.Fatal("deploy/daemonset.yaml has no cowcsi container")
	}
	opts := driver.DefaultOptions()
	fs, _ := newFlagSet(&opts)
	if err := fs.Parse(args); err != nil || fs.NArg() > 0 {
		t.Fatalf("deploy's cowcsi args %q: %v (left over %q)", args, err, fs.Args())
	}
	if err := opts.Validate(); err != nil {
		t.Fatalf("deploy's cowcsi args %q: %v", args, err)
	}
	if spec.TerminationGracePeriodSeconds == nil {
		t.Fatal("deploy/daemonset.yaml sets no terminationGracePeriodSeconds (the default is 30 s)")
	}
	grace := time.Duration(*spec.TerminationGracePeriodSeconds) * time.Second
	if need := opts.StopTimeout + opts.FreezeTimeout + stopMargin; grace < need {
		t.Errorf("terminationGracePeriodSeconds %v < --stop-timeout %v + --freeze-timeout %v + %v", grace, opts.StopTimeout, opts.FreezeTimeout, stopMargin)
	}
}
