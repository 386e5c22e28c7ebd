//go:build tools

// Package tools names the programs the cluster tests build from this module.
package tools

import (
	_ "github.com/coredns/coredns"
)
