//go:build tools

// Package tools pins the Helm CLI, built from its official module.
package tools

import _ "helm.sh/helm/v4/cmd/helm"
