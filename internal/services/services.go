// Package services runs a job's `services:` (databases, brokers, web
// servers) beside it: the list the runner hands the custom executor, a
// service's container command started in the background in a session of
// its own, the wait until it listens on its ports, the hosts file that
// makes its alias resolve to the loopback address, and stopping it.
//
// A service outlives the prepare stage that starts it and is stopped by
// the cleanup stage, which are separate processes: what ties them is a
// Running record in the job's state (pid, the kernel's start time of that
// pid, its session). Building the container command is the runtime's job
// (mechanism.RunSpec.Service); deciding what runs is package stages'.
package services

import (
	"encoding/json"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
)

// Variable is the job variable the runner puts the services in.
const Variable = "CI_JOB_SERVICES"

// DebugVariable puts the services' output in the job log (GitLab's name).
const DebugVariable = "CI_DEBUG_SERVICES"

// PortVariable is GitLab's service variable naming the port to wait for.
const PortVariable = "HEALTHCHECK_TCP_PORT"

// Spec is one service as the job asks for it.
type Spec struct {
	// Image is the service's image reference (GitLab's "name").
	Image string
	// Hosts are the names the job reaches it by: its aliases, then the
	// last path part of the image without tag ("postgres" for
	// "registry/x/postgres:16"), as GitLab derives it.
	Hosts []string
	// Entrypoint and Command are as in the job's .gitlab-ci.yml.
	Entrypoint, Command []string
	// Variables are the service's own variables, expanded by the runner.
	Variables map[string]string
	// Ports are the TCP ports the service must listen on before the job
	// starts (HEALTHCHECK_TCP_PORT, or the payload's ports).
	Ports []int
}

// Name is the service's name in the log: its first host name.
func (s Spec) Name() string { return s.Hosts[0] }

// jsonService is the runner's shape (executors/custom/custom.go).
type jsonService struct {
	Name       string            `json:"name"`
	Alias      string            `json:"alias"`
	Entrypoint []string          `json:"entrypoint"`
	Command    []string          `json:"command"`
	Variables  map[string]string `json:"variables"`
}

var hostname = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$`)

// Parse reads the runner's CI_JOB_SERVICES value ("" when the job has
// none). ports are the trusted payload's ports per service, in the same
// order (nil entries when the payload has none). Every error is the
// job's to fix and says what to change.
func Parse(value string, ports [][]int) ([]Spec, error) {
	if strings.TrimSpace(value) == "" {
		return nil, nil
	}
	var raw []jsonService
	if err := json.Unmarshal([]byte(value), &raw); err != nil {
		return nil, fmt.Errorf("%s is not the runner's list of services (%v)", Variable, err)
	}
	out := make([]Spec, 0, len(raw))
	seen := map[string]int{}
	for i, r := range raw {
		if strings.TrimSpace(r.Name) == "" {
			return nil, fmt.Errorf("services[%d] has no image name", i)
		}
		s := Spec{Image: r.Name, Entrypoint: r.Entrypoint, Command: r.Command, Variables: r.Variables}
		names := strings.Fields(strings.ReplaceAll(r.Alias, ",", " "))
		for _, a := range names {
			if !hostname.MatchString(a) {
				return nil, fmt.Errorf("services[%d] (%s): alias %q is not a host name (letters, digits and '-'); change it", i, r.Name, a)
			}
		}
		for _, h := range names {
			if j, dup := seen[h]; dup && j != i {
				return nil, fmt.Errorf("services[%d] and services[%d] are both called %q; give one of them another alias", j, i, h)
			}
			seen[h] = i
			s.Hosts = appendUnique(s.Hosts, h)
		}
		// The name derived from the image, unless it is no host name or an
		// earlier service has it (two services of one image: the first).
		if h := imageHost(r.Name); hostname.MatchString(h) {
			if _, dup := seen[h]; !dup {
				seen[h] = i
				s.Hosts = append(s.Hosts, h)
			}
		}
		if len(s.Hosts) == 0 {
			return nil, fmt.Errorf("services[%d] (%s) has no host name of its own; give it an alias", i, r.Name)
		}
		if i < len(ports) {
			s.Ports = append(s.Ports, ports[i]...)
		}
		if v, ok := lookupFold(r.Variables, PortVariable); ok {
			p, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil || p < 1 || p > 65535 {
				return nil, fmt.Errorf("services[%d] (%s): %s=%q is not a TCP port", i, r.Name, PortVariable, v)
			}
			s.Ports = append(s.Ports, p)
		}
		sort.Ints(s.Ports)
		s.Ports = dedupInts(s.Ports)
		out = append(out, s)
	}
	return out, nil
}

// imageHost is GitLab's host name for a service image: the last path
// part without tag or digest, "/" and "." made "-" ("mysql" for
// "mysql:8", "tutum-wordpress" for "tutum/wordpress" is the Docker
// executor's second name; the last part is the one every executor has).
func imageHost(image string) string {
	name := image
	if i := strings.Index(name, "@"); i >= 0 {
		name = name[:i]
	}
	if i := strings.LastIndex(name, "/"); i >= 0 {
		name = name[i+1:]
	}
	if i := strings.Index(name, ":"); i >= 0 {
		name = name[:i]
	}
	return strings.ReplaceAll(name, ".", "-")
}

func lookupFold(m map[string]string, key string) (string, bool) {
	for k, v := range m {
		if strings.EqualFold(k, key) {
			return v, true
		}
	}
	return "", false
}

func appendUnique(list []string, s string) []string {
	for _, x := range list {
		if x == s {
			return list
		}
	}
	return append(list, s)
}

func dedupInts(in []int) []int {
	out := in[:0]
	for i, v := range in {
		if i == 0 || v != in[i-1] {
			out = append(out, v)
		}
	}
	return out
}

// Argv is the command the service runs: entrypoint then command, as
// Docker does. Empty means the image's own.
func (s Spec) Argv() []string {
	return append(append([]string(nil), s.Entrypoint...), s.Command...)
}

// HostsFile is the /etc/hosts the job's container gets: localhost and
// every service's names on the loopback address (services share the
// host's network), after the lines of the host's own file.
func HostsFile(host []byte, specs []Spec) []byte {
	var b strings.Builder
	b.Write(host)
	if len(host) > 0 && !strings.HasSuffix(string(host), "\n") {
		b.WriteByte('\n')
	}
	b.WriteString("# ci-exec: the job's services\n127.0.0.1\tlocalhost")
	for _, s := range specs {
		for _, h := range s.Hosts {
			b.WriteString(" " + h)
		}
	}
	b.WriteString("\n::1\tlocalhost ip6-localhost\n")
	return []byte(b.String())
}
