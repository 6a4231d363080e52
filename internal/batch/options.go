package batch

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/ci-exec/ci-exec/internal/policy"
	"github.com/google/shlex"
)

// valueKind is how an sbatch option takes its value, as getopt_long sees it.
type valueKind int

const (
	noValue       valueKind = iota // --hold, -H
	needsValue                     // --time=1:00, --time 1:00, -t1:00, -t 1:00
	optionalValue                  // --nice, --nice=5, -k, -koff (never a separate word)
)

// sbatchOption is one option of sbatch 22.05.
type sbatchOption struct {
	long  string // without dashes: "nodes"
	short byte   // 'N', or 0
	kind  valueKind
}

// sbatchOptions is every option documented in sbatch(1) of Slurm 22.05.8
// (Debian 12's slurm-wlm), with the value kind sbatch's getopt_long
// reported when probed on this machine: `sbatch --test-only --NAME` answers
// "requires an argument" for needsValue, and `--NAME=x` answers "doesn't
// allow an argument" for noValue; the rest accept an attached value only.
//
// The table exists because user arguments must be parsed exactly the way
// sbatch will parse them: a word after a flag that takes a value is that
// value, anything else is a flag or a positional word. A flag that is not in
// the table is refused rather than guessed at, and so are abbreviations
// (getopt_long accepts "--out=x" for "--output=x"): checking "--out" against
// a deny list that names "--output" would otherwise let it through.
var sbatchOptions = []sbatchOption{
	{"account", 'A', needsValue}, {"acctg-freq", 0, needsValue}, {"array", 'a', needsValue},
	{"batch", 0, needsValue}, {"bb", 0, needsValue}, {"bbf", 0, needsValue},
	{"begin", 'b', needsValue}, {"chdir", 'D', needsValue}, {"cluster-constraint", 0, needsValue},
	{"clusters", 'M', needsValue}, {"comment", 0, needsValue}, {"constraint", 'C', needsValue},
	{"container", 0, needsValue}, {"contiguous", 0, noValue}, {"core-spec", 'S', needsValue},
	{"cores-per-socket", 0, needsValue}, {"cpu-freq", 0, needsValue}, {"cpus-per-gpu", 0, needsValue},
	{"cpus-per-task", 'c', needsValue}, {"deadline", 0, needsValue}, {"delay-boot", 0, needsValue},
	{"dependency", 'd', needsValue}, {"distribution", 'm', needsValue}, {"error", 'e', needsValue},
	{"exclude", 'x', needsValue}, {"exclusive", 0, optionalValue}, {"export", 0, needsValue},
	{"export-file", 0, needsValue}, {"extra-node-info", 'B', needsValue}, {"get-user-env", 0, optionalValue},
	{"gid", 0, needsValue}, {"gpu-bind", 0, needsValue}, {"gpu-freq", 0, needsValue},
	{"gpus", 'G', needsValue}, {"gpus-per-node", 0, needsValue}, {"gpus-per-socket", 0, needsValue},
	{"gpus-per-task", 0, needsValue}, {"gres", 0, needsValue}, {"gres-flags", 0, needsValue},
	{"help", 'h', noValue}, {"hint", 0, needsValue}, {"hold", 'H', noValue},
	{"ignore-pbs", 0, noValue}, {"input", 'i', needsValue}, {"job-name", 'J', needsValue},
	{"kill-on-invalid-dep", 0, needsValue}, {"licenses", 'L', needsValue}, {"mail-type", 0, needsValue},
	{"mail-user", 0, needsValue}, {"mcs-label", 0, needsValue}, {"mem", 0, needsValue},
	{"mem-bind", 0, needsValue}, {"mem-per-cpu", 0, needsValue}, {"mem-per-gpu", 0, needsValue},
	{"mincpus", 0, needsValue}, {"network", 0, needsValue}, {"nice", 0, optionalValue},
	{"no-kill", 'k', optionalValue}, {"no-requeue", 0, noValue}, {"nodefile", 'F', needsValue},
	{"nodelist", 'w', needsValue}, {"nodes", 'N', needsValue}, {"ntasks", 'n', needsValue},
	{"ntasks-per-core", 0, needsValue}, {"ntasks-per-gpu", 0, needsValue}, {"ntasks-per-node", 0, needsValue},
	{"ntasks-per-socket", 0, needsValue}, {"open-mode", 0, needsValue}, {"output", 'o', needsValue},
	{"overcommit", 'O', noValue}, {"oversubscribe", 's', noValue}, {"parsable", 0, noValue},
	{"partition", 'p', needsValue}, {"power", 0, needsValue}, {"prefer", 0, needsValue},
	{"priority", 0, needsValue}, {"profile", 0, needsValue}, {"propagate", 0, optionalValue},
	{"qos", 'q', needsValue}, {"quiet", 'Q', noValue}, {"reboot", 0, noValue},
	{"requeue", 0, noValue}, {"reservation", 0, needsValue}, {"signal", 0, needsValue},
	{"sockets-per-node", 0, needsValue}, {"spread-job", 0, noValue}, {"switches", 0, needsValue},
	{"test-only", 0, noValue}, {"thread-spec", 0, needsValue}, {"threads-per-core", 0, needsValue},
	{"time", 't', needsValue}, {"time-min", 0, needsValue}, {"tmp", 0, needsValue},
	{"uid", 0, needsValue}, {"usage", 0, noValue}, {"use-min-nodes", 0, noValue},
	{"verbose", 'v', noValue}, {"version", 'V', noValue}, {"wait", 'W', noValue},
	{"wait-all-nodes", 0, needsValue}, {"wckey", 0, needsValue}, {"wrap", 0, needsValue},
}

// ownedOptions are the sbatch options ci-exec sets itself or cannot work
// with. Neither users nor the admin's `options` may give them, whatever the
// allow and deny lists say:
//   - output, error, input, job-name, chdir, parsable: ci-exec reads the
//     job id from --parsable, tails the --output file and finds the job by
//     its name; a second --output would silently empty the live log;
//   - wait, wrap: ci-exec submits the batch script itself and polls;
//   - array: one CI stage is one job; an array would run the script N times
//     with N exit codes and one output file;
//   - test-only, help, usage, version: sbatch would print text instead of a
//     job id.
var ownedOptions = map[string]bool{
	"output": true, "error": true, "input": true, "job-name": true, "chdir": true, "parsable": true,
	"wait": true, "wrap": true, "array": true, "test-only": true, "help": true, "usage": true, "version": true,
}

// clusterOptions send the job to another cluster (-M/--clusters) or let a
// federation start it on one (--cluster-constraint). ci-exec follows a
// job with scontrol and scancel on the cluster they talk to, where such a
// job is not found: it would vanish from ci-exec's view, never be
// cancelled, and run on unsupervised. Refused for users and the admin
// alike; to use another cluster, point the runner at it (SLURM_CONF in
// the runner's environment, which sbatch, scontrol and scancel all get).
var clusterOptions = map[string]bool{"clusters": true, "cluster-constraint": true}

const clusterHint = "sends the job to another Slurm cluster, where ci-exec cannot follow or cancel it"

// sbatchTable is sbatchOptions as the shared option checker's table
// (policy.FlagTable.Parse): sbatch's getopt_long and the runtimes' run
// options are parsed by the same code.
var sbatchTable = func() policy.FlagTable {
	kinds := map[valueKind]policy.ArgKind{noValue: policy.NoArg, needsValue: policy.RequiredArg, optionalValue: policy.OptionalArg}
	t := make(policy.FlagTable, 0, len(sbatchOptions))
	for _, o := range sbatchOptions {
		f := policy.Flag{Long: "--" + o.long, Arg: kinds[o.kind]}
		if o.short != 0 {
			f.Short = "-" + string(o.short)
		}
		t = append(t, f)
	}
	return t
}()

func lookupLong(name string) (sbatchOption, bool) {
	for _, o := range sbatchOptions {
		if o.long == name {
			return o, true
		}
	}
	return sbatchOption{}, false
}

// canonicalFlag maps "-N", "--nodes" or "--nodes=2" to "nodes".
func canonicalFlag(flag string) (string, bool) {
	long, ok := sbatchTable.Canonical(flag)
	return strings.TrimPrefix(long, "--"), ok
}

// displayFlag renders a canonical name as users write it: "-N/--nodes".
func displayFlag(long string) string {
	o, _ := lookupLong(long)
	if o.short != 0 {
		return "-" + string(o.short) + "/--" + long
	}
	return "--" + long
}

// parsedOption is one option found in an argument list.
type parsedOption struct {
	name    string // canonical long name
	written string // as written: "-N", "--nodes"
}

// ArgError is an sbatch argument list that cannot be used; the message says
// what is wrong and what to write instead.
type ArgError struct{ Msg string }

func (e *ArgError) Error() string { return e.Msg }

func argErrorf(format string, args ...any) error { return &ArgError{Msg: fmt.Sprintf(format, args...)} }

// parseOptions walks words the way sbatch's getopt_long will (the shared
// checker, policy.FlagTable.Parse) and returns the options in order. Every
// word must be an option or an option's value: a positional word would
// become sbatch's script argument (so the job would run that file instead
// of ci-exec's batch script) and ":" would start a heterogeneous job
// component.
func parseOptions(words []string) ([]parsedOption, error) {
	opts, err := sbatchTable.Parse(words)
	var pe *policy.ParseError
	if errors.As(err, &pe) {
		name := strings.TrimLeft(pe.Word, "-")
		switch pe.Kind {
		case policy.NotAFlag:
			return nil, argErrorf("%q is not an sbatch option (only options may be given, no script, command or ':')", pe.Word)
		case policy.UnknownFlag:
			if strings.HasPrefix(pe.Word, "--") {
				return nil, argErrorf("%s is not an sbatch option%s", pe.Word, suggest(name))
			}
			return nil, argErrorf("%s is not an sbatch option", pe.Word)
		case policy.TakesNoValue:
			return nil, argErrorf("%s takes no value (write just %s)", pe.Word, pe.Word)
		case policy.NeedsValue:
			if strings.HasPrefix(pe.Word, "--") {
				return nil, argErrorf("%s needs a value (%s=VALUE)", pe.Word, pe.Word)
			}
			return nil, argErrorf("%s needs a value (%s VALUE)", pe.Word, pe.Word)
		default:
			// sbatch would take the next word as its script.
			return nil, argErrorf("%s takes its value attached: %s=%s", pe.Word, pe.Word, pe.Next)
		}
	}
	out := make([]parsedOption, 0, len(opts))
	for _, o := range opts {
		out = append(out, parsedOption{name: strings.TrimPrefix(o.Flag.Long, "--"), written: o.Written})
	}
	return out, nil
}

// suggest names the options an unknown long name abbreviates, because
// sbatch would have accepted the abbreviation and the user may wonder why
// ci-exec does not.
func suggest(name string) string {
	var cands []string
	for _, o := range sbatchOptions {
		if strings.HasPrefix(o.long, name) {
			cands = append(cands, "--"+o.long)
		}
	}
	switch {
	case len(cands) == 0:
		return " (see `man sbatch`)"
	case len(cands) > 3:
		cands = append(cands[:3], "...")
	}
	return fmt.Sprintf(" (write options in full, e.g. %s)", strings.Join(cands, ", "))
}

// Policy is the admin's rule for user-supplied sbatch options.
type Policy struct {
	// Allowed, when not empty, are the only options users may give.
	Allowed []string
	// Denied are options users may never give.
	Denied []string
}

// canonicalSet resolves a flag list from the config ("-N", "--nodes").
func canonicalSet(key string, flags []string) (map[string]bool, error) {
	set := map[string]bool{}
	for _, f := range flags {
		c, ok := canonicalFlag(f)
		if !ok {
			return nil, fmt.Errorf("batch.%s: %q is not an sbatch option of Slurm 22.05 (write it in full, e.g. \"--nodes\" or \"-N\")", key, f)
		}
		set[c] = true
	}
	return set, nil
}

// UserArgs splits the users' scheduler parameters without a shell (quotes
// and backslashes work as in a shell, except that inside double quotes a
// backslash escapes any character; nothing is expanded) and checks every
// option against the policy. raw maps each arguments variable to its value;
// order gives the variables' order. A *ArgError is the user's to fix; any
// other error is the admin's (a bad flag list in the config).
func UserArgs(order []string, raw map[string]string, p Policy) ([]string, error) {
	allowed, err := canonicalSet("allowed_flags", p.Allowed)
	if err != nil {
		return nil, err
	}
	denied, err := canonicalSet("denied_flags", p.Denied)
	if err != nil {
		return nil, err
	}
	var all []string
	for _, name := range order {
		v := raw[name]
		if strings.TrimSpace(v) == "" {
			continue
		}
		words, err := shlex.Split(v)
		if err != nil {
			return nil, argErrorf("%s: cannot split %q into words (%v); check its quotes", name, v, err)
		}
		opts, err := parseOptions(words)
		if err != nil {
			return nil, argErrorf("%s: %v", name, err)
		}
		for _, o := range opts {
			switch {
			case ownedOptions[o.name]:
				return nil, argErrorf("%s: %s is set by ci-exec and cannot be changed (the output is streamed into this log)", name, o.written)
			case clusterOptions[o.name]:
				return nil, argErrorf("%s: %s %s; remove it (this runner submits to its own cluster only)", name, o.written, clusterHint)
			case len(allowed) > 0 && !allowed[o.name]:
				return nil, argErrorf("%s: %s is not allowed by the runner's admin; allowed options are %s", name, o.written, names(allowed))
			case denied[o.name]:
				return nil, argErrorf("%s: %s is not allowed by the runner's admin (denied options: %s)", name, o.written, names(denied))
			}
		}
		all = append(all, words...)
	}
	return all, nil
}

// CheckAdminOptions checks the admin's `options`: they are trusted, but
// they must parse and must not take over an option ci-exec owns.
func CheckAdminOptions(options []string) error {
	opts, err := parseOptions(options)
	if err != nil {
		return fmt.Errorf("batch.options: %v", err)
	}
	for _, o := range opts {
		if ownedOptions[o.name] {
			return fmt.Errorf("batch.options: %s is set by ci-exec itself; remove it", o.written)
		}
		if clusterOptions[o.name] {
			return fmt.Errorf("batch.options: %s %s; remove it, and set SLURM_CONF in the runner's environment to submit to another cluster", o.written, clusterHint)
		}
	}
	return nil
}

func names(set map[string]bool) string {
	out := make([]string, 0, len(set))
	for n := range set {
		out = append(out, displayFlag(n))
	}
	sort.Strings(out)
	return strings.Join(out, ", ")
}

// SubmitSpec is everything sbatch's argument list is made of.
type SubmitSpec struct {
	// JobName is the Slurm job name (see JobName).
	JobName string
	// Output is the output file, a literal path (no "%j": Run follows it
	// before the job id is known).
	Output string
	// Chdir is the batch script's working directory on the compute node.
	Chdir string
	// AdminOptions come from batch.options (checked by CheckAdminOptions).
	AdminOptions []string
	// UserArgs come from the arguments variables (checked by UserArgs).
	UserArgs []string
	// Comment is the CI job's identity (Identity.Comment), so that
	// ci-exec finds its jobs again ("" = none).
	Comment string
}

// SbatchArgs builds sbatch's options (without the program and the batch
// script, which Run adds last). Order matters
// because for a repeated option sbatch keeps the last one:
//
//  1. ci-exec's defaults that the admin or user may change: --no-requeue,
//     because a job requeued after a node failure would run the build
//     script a second time behind the runner's back, and --export=ALL, so
//     the job starts with exactly the environment ci-exec gives sbatch;
//  2. the admin's options, as defaults;
//  3. the user's arguments, which may override the admin's defaults unless
//     the admin denies those options;
//  4. the options ci-exec owns (see ownedOptions), last so nothing can
//     override them; --comment too: it is how `ci-exec sweep` and cleanup
//     recognise the job (a user's --comment is overridden).
func SbatchArgs(s SubmitSpec) []string {
	args := []string{"--no-requeue", "--export=ALL"}
	args = append(args, s.AdminOptions...)
	args = append(args, s.UserArgs...)
	if s.Comment != "" {
		args = append(args, "--comment="+s.Comment)
	}
	return append(args,
		"--job-name="+s.JobName,
		"--output="+s.Output,
		"--chdir="+s.Chdir,
		"--parsable",
	)
}

// JobName is the Slurm job name of a CI job's stage: "ci-<job id>-<stage>",
// so that `squeue` shows which CI job a Slurm job belongs to. The stage is
// reduced to safe characters.
func JobName(ciJobID int64, stage string) string {
	var b strings.Builder
	for _, r := range stage {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return fmt.Sprintf("ci-%d-%s", ciJobID, b.String())
}
