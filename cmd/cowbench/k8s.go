package main

import (
	"context"
	"fmt"
	"io"
)

func runK8s(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fmt.Fprintln(stderr, "cowbench k8s: not yet")
	return exitSetup
}
