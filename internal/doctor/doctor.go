// Package doctor is `ci-exec check`.
package doctor

import (
	"context"
	"io"
)

// Usage is `ci-exec help check`.
const Usage = "usage: ci-exec [--config PATH] check [--json] [--as USER]\n"

// Main is `ci-exec check`.
func Main(ctx context.Context, args []string, configPath string, stdout, stderr io.Writer) int { return 0 }
