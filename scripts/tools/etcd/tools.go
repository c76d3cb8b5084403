//go:build tools

// Package tools pins etcd, built from its official module: Kubernetes v1.34 wants etcd 3.6
// (Debian 12 ships 3.4).
package tools

import _ "go.etcd.io/etcd/server/v3"
