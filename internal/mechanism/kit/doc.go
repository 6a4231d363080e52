// Package kit is the container runtimes' shared helper kit, used only by
// the runtimes (./charliecloud, ./apptainer): the per-user Base (probe
// once and remember it, the image store, leases, eviction, state checks),
// the digest lookup under the pull's credential rules, the classification
// of pull failures into one-line job-log errors, the tools' environment,
// program lookup, and running a runtime's own tools with a bounded tail.
package kit
