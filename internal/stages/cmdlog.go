package stages

import (
	"strings"

	"github.com/ci-exec/ci-exec/internal/joblog"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/policy"
)

// LogCommand prints a container command line to the job log in a collapsed
// section, as one copy-pasteable line (env -i KEY=VALUE... argv...), so a
// user can see exactly what ran and rerun it by hand. Every word is masked
// before it is quoted: quoting a pass_env value that holds a masked
// variable's value and a single quote splits the secret around the quote,
// and the logger's masking of the finished line would no longer find it.
// Credentials never appear because they are never part of a run command.
func LogCommand(log *joblog.Logger, section, header string, argv, env []string) {
	end := log.Section(section, header, false)
	defer end()
	line := make([]string, 0, len(env)+len(argv)+2)
	if len(env) > 0 {
		line = append(line, "env", "-i")
		line = append(line, env...)
	}
	line = append(line, argv...)
	for i, w := range line {
		line[i] = log.Redact(w)
	}
	log.Printf("%s", joblog.QuoteArgv(line))
}

// Describe is the short job-log form of where a stage runs.
func Describe(p policy.Placement, img *mechanism.Image, runtime string) string {
	if p == policy.OnHost || img == nil {
		return "on the host"
	}
	var b strings.Builder
	b.WriteString("in ")
	b.WriteString(img.Ref)
	if img.Digest != "" {
		b.WriteString(" (" + img.Digest + ")")
	}
	b.WriteString(" with " + runtime)
	return b.String()
}
