package batch

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const argsVar = "SLURM_ARGS"

// userArgs runs UserArgs for one arguments variable.
func userArgs(v string, p Policy) ([]string, error) {
	return UserArgs([]string{argsVar}, map[string]string{argsVar: v}, p)
}

func TestUserArgsAccepted(t *testing.T) {
	tests := map[string]struct {
		value  string
		policy Policy
		want   []string
	}{
		"long with =":                 {value: "--nodes=2 --time=1:00:00", want: []string{"--nodes=2", "--time=1:00:00"}},
		"long with separate value":    {value: "--nodes 2 --partition debug", want: []string{"--nodes", "2", "--partition", "debug"}},
		"short separate value":        {value: "-N 2", want: []string{"-N", "2"}},
		"short attached value":        {value: "-N2 -n1", want: []string{"-N2", "-n1"}},
		"short cluster of flags":      {value: "-QH -v", want: []string{"-QH", "-v"}},
		"cluster ending in value":     {value: "-QN 2", want: []string{"-QN", "2"}},
		"cluster with value attached": {value: "-QN2", want: []string{"-QN2"}},
		"value that looks like an option": {value: "-N -5 --comment --hold",
			want: []string{"-N", "-5", "--comment", "--hold"}},
		"optional value alone":          {value: "--nice", want: []string{"--nice"}},
		"optional value attached":       {value: "--nice=5 --exclusive=user", want: []string{"--nice=5", "--exclusive=user"}},
		"optional value before option":  {value: "--nice -N 2", want: []string{"--nice", "-N", "2"}},
		"short optional value attached": {value: "-koff", want: []string{"-koff"}},
		"short optional value alone":    {value: "-k -N1", want: []string{"-k", "-N1"}},
		"double quotes":                 {value: `--comment="build #5 of 'app'"`, want: []string{"--comment=build #5 of 'app'"}},
		"single quotes":                 {value: `--comment='a "b" c'`, want: []string{`--comment=a "b" c`}},
		"backslash space":               {value: `--comment=a\ b`, want: []string{"--comment=a b"}},
		"backslash quote":               {value: `--comment=it\'s`, want: []string{"--comment=it's"}},
		"backslash in single quotes":    {value: `--comment='a\b'`, want: []string{`--comment=a\b`}},
		"nothing is expanded":           {value: `--comment=$HOME --wckey='$(touch x)' --mail-user=` + "`id`", want: []string{"--comment=$HOME", "--wckey=$(touch x)", "--mail-user=`id`"}},
		"no glob expansion":             {value: "--nodelist=node[1-4] --comment=*", want: []string{"--nodelist=node[1-4]", "--comment=*"}},
		"newlines and tabs separate":    {value: "-N 2\n\t--time=10\n", want: []string{"-N", "2", "--time=10"}},
		"trailing comment":              {value: "-N 2 # two nodes", want: []string{"-N", "2"}},
		"empty quoted value":            {value: `--comment="" -t ''`, want: []string{"--comment=", "-t", ""}},
		"allowed by long name":          {value: "-N 2 --time=5", policy: Policy{Allowed: []string{"--nodes", "-t"}}, want: []string{"-N", "2", "--time=5"}},
		"allowed given with a value":    {value: "--nodes=3", policy: Policy{Allowed: []string{"--nodes=2"}}, want: []string{"--nodes=3"}},
		"denied does not match others":  {value: "-N 1", policy: Policy{Denied: []string{"-p", "--qos"}}, want: []string{"-N", "1"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := userArgs(tc.value, tc.policy)
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestUserArgsRefused(t *testing.T) {
	const notOption = ` is not an sbatch option (only options may be given, no script, command or ':')`
	const owned = ` is set by ci-exec and cannot be changed (the output is streamed into this log)`
	const cluster = ` sends the job to another Slurm cluster, where ci-exec cannot follow or cancel it; remove it (this runner submits to its own cluster only)`
	tests := map[string]struct {
		value  string
		policy Policy
		msg    string
	}{
		"positional word":                   {value: "-N 2 build.sh", msg: `"build.sh"` + notOption},
		"positional first":                  {value: "hostname", msg: `"hostname"` + notOption},
		"double dash":                       {value: "-N 2 -- hostname", msg: `"--"` + notOption},
		"single dash":                       {value: "-", msg: `"-"` + notOption},
		"colon (het job)":                   {value: "-N 1 : -N 2", msg: `":"` + notOption},
		"empty quoted word":                 {value: `-N 1 ""`, msg: `""` + notOption},
		"unknown long":                      {value: "--frobnicate", msg: "--frobnicate is not an sbatch option (see `man sbatch`)"},
		"unknown long value":                {value: "--frobnicate=1", msg: "--frobnicate is not an sbatch option (see `man sbatch`)"},
		"abbreviation":                      {value: "--out=/tmp/x", msg: "--out is not an sbatch option (write options in full, e.g. --output)"},
		"abbreviation, 2":                   {value: "--part debug", msg: "--part is not an sbatch option (write options in full, e.g. --partition)"},
		"ambiguous abbreviation":            {value: "--n 2", msg: "--n is not an sbatch option (write options in full, e.g. --network, --nice, --no-kill, ...)"},
		"unknown short":                     {value: "-X", msg: "-X is not an sbatch option"},
		"unknown short in cluster":          {value: "-QX", msg: "-X is not an sbatch option"},
		"no-value given a value":            {value: "--hold=yes", msg: "--hold takes no value (write just --hold)"},
		"long missing value":                {value: "-N 1 --time", msg: "--time needs a value (--time=VALUE)"},
		"short missing value":               {value: "-t", msg: "-t needs a value (-t VALUE)"},
		"cluster missing value":             {value: "-Qt", msg: "-t needs a value (-t VALUE)"},
		"optional value as next word":       {value: "--nice 5", msg: "--nice takes its value attached: --nice=5"},
		"short optional value as next word": {value: "-k off", msg: `"off"` + notOption},
		"unclosed quote":                    {value: `--comment="abc`, msg: `cannot split "--comment=\"abc" into words (EOF found when expecting closing quote); check its quotes`},

		"--output":              {value: "--output=/tmp/x", msg: "--output" + owned},
		"-o":                    {value: "-o /tmp/x", msg: "-o" + owned},
		"-o attached":           {value: "-o/tmp/x", msg: "-o" + owned},
		"-o in a cluster":       {value: "-Qo/tmp/x", msg: "-o" + owned},
		"--error":               {value: "--error=/tmp/x", msg: "--error" + owned},
		"-e":                    {value: "-e x", msg: "-e" + owned},
		"--input":               {value: "--input=x", msg: "--input" + owned},
		"-i":                    {value: "-i x", msg: "-i" + owned},
		"--job-name":            {value: "--job-name=mine", msg: "--job-name" + owned},
		"-J":                    {value: "-J mine", msg: "-J" + owned},
		"--chdir":               {value: "--chdir=/", msg: "--chdir" + owned},
		"-D":                    {value: "-D /", msg: "-D" + owned},
		"--parsable":            {value: "--parsable", msg: "--parsable" + owned},
		"--wrap":                {value: `--wrap "rm -rf ~"`, msg: "--wrap" + owned},
		"--wrap=":               {value: "--wrap=hostname", msg: "--wrap" + owned},
		"--array":               {value: "--array=1-3", msg: "--array" + owned},
		"-a":                    {value: "-a 1-3", msg: "-a" + owned},
		"--wait":                {value: "--wait", msg: "--wait" + owned},
		"-W":                    {value: "-W", msg: "-W" + owned},
		"--test-only":           {value: "--test-only", msg: "--test-only" + owned},
		"-h":                    {value: "-h", msg: "-h" + owned},
		"--usage":               {value: "--usage", msg: "--usage" + owned},
		"-V":                    {value: "-V", msg: "-V" + owned},
		"owned even if allowed": {value: "--output=x", policy: Policy{Allowed: []string{"--output"}}, msg: "--output" + owned},

		"-M":                         {value: "-M other", msg: "-M" + cluster},
		"-M attached":                {value: "-Mother", msg: "-M" + cluster},
		"-M in a cluster of flags":   {value: "-QMother", msg: "-M" + cluster},
		"--clusters":                 {value: "--clusters=a,b", msg: "--clusters" + cluster},
		"--clusters separate value":  {value: "--clusters all", msg: "--clusters" + cluster},
		"--cluster-constraint":       {value: "--cluster-constraint=gpu", msg: "--cluster-constraint" + cluster},
		"--clusters even if allowed": {value: "--clusters=a", policy: Policy{Allowed: []string{"--clusters"}}, msg: "--clusters" + cluster},
		"-M after an allowed option": {value: "-N 1 -M b", msg: "-M" + cluster},

		"not in allowed list": {value: "-N 2 -n 4", policy: Policy{Allowed: []string{"--nodes", "-t"}},
			msg: "-n is not allowed by the runner's admin; allowed options are -N/--nodes, -t/--time"},
		"allowed list, long form": {value: "--ntasks=4", policy: Policy{Allowed: []string{"--time"}},
			msg: "--ntasks is not allowed by the runner's admin; allowed options are -t/--time"},
		"denied long, given short": {value: "-p debug", policy: Policy{Denied: []string{"--partition"}},
			msg: "-p is not allowed by the runner's admin (denied options: -p/--partition)"},
		"denied short, given long": {value: "--partition=debug", policy: Policy{Denied: []string{"-p"}},
			msg: "--partition is not allowed by the runner's admin (denied options: -p/--partition)"},
		"denied, long only option": {value: "--qos=high", policy: Policy{Denied: []string{"--qos", "--reservation"}},
			msg: "--qos is not allowed by the runner's admin (denied options: --reservation, -q/--qos)"},
		"denied -H in -QH": {value: "-QH", policy: Policy{Denied: []string{"--hold"}},
			msg: "-H is not allowed by the runner's admin (denied options: -H/--hold)"},
		"denied flag hidden after a value option": {value: "-N2 -H", policy: Policy{Denied: []string{"-H"}},
			msg: "-H is not allowed by the runner's admin (denied options: -H/--hold)"},
		"denied wins over allowed": {value: "-N 1", policy: Policy{Allowed: []string{"-N"}, Denied: []string{"--nodes"}},
			msg: "-N is not allowed by the runner's admin (denied options: -N/--nodes)"},
		"denied optional value": {value: "--nice=-5", policy: Policy{Denied: []string{"--nice"}},
			msg: "--nice is not allowed by the runner's admin (denied options: --nice)"},
		"denied -k attached": {value: "-koff", policy: Policy{Denied: []string{"--no-kill"}},
			msg: "-k is not allowed by the runner's admin (denied options: -k/--no-kill)"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := userArgs(tc.value, tc.policy)
			require.Error(t, err)
			assert.Nil(t, got)
			var ae *ArgError
			require.True(t, errors.As(err, &ae), "want *ArgError, got %T: %v", err, err)
			assert.Equal(t, argsVar+": "+tc.msg, err.Error())
		})
	}
}

func TestUserArgsBackslashInDoubleQuotes(t *testing.T) {
	// Documented difference from a POSIX shell (docs/slurm.md): inside
	// double quotes a backslash escapes any character, as google/shlex
	// splits; write "\\" for one backslash.
	got, err := userArgs(`--comment="C:\dir\file"`, Policy{})
	require.NoError(t, err)
	assert.Equal(t, []string{`--comment=C:dirfile`}, got)
	got, err = userArgs(`--comment="C:\\dir"`, Policy{})
	require.NoError(t, err)
	assert.Equal(t, []string{`--comment=C:\dir`}, got)
}

func TestUserArgsVariables(t *testing.T) {
	raw := map[string]string{
		"A":        "-N 2",
		"B":        "",
		"C":        "--time=5 -p debug",
		"D":        "   \n\t ",
		"UNLISTED": "--output=x",
	}
	t.Run("in the given order, empty ones skipped, unlisted ignored", func(t *testing.T) {
		got, err := UserArgs([]string{"A", "B", "C", "D", "MISSING"}, raw, Policy{})
		require.NoError(t, err)
		assert.Equal(t, []string{"-N", "2", "--time=5", "-p", "debug"}, got)
	})
	t.Run("reverse order", func(t *testing.T) {
		got, err := UserArgs([]string{"C", "A"}, raw, Policy{})
		require.NoError(t, err)
		assert.Equal(t, []string{"--time=5", "-p", "debug", "-N", "2"}, got)
	})
	t.Run("nothing at all", func(t *testing.T) {
		got, err := UserArgs(nil, nil, Policy{Allowed: []string{"-N"}})
		require.NoError(t, err)
		assert.Empty(t, got)
		got, err = UserArgs([]string{"B", "D"}, raw, Policy{})
		require.NoError(t, err)
		assert.Empty(t, got)
	})
	t.Run("only a comment", func(t *testing.T) {
		got, err := UserArgs([]string{"X"}, map[string]string{"X": "# nothing"}, Policy{})
		require.NoError(t, err)
		assert.Empty(t, got)
	})
	t.Run("each variable is parsed on its own", func(t *testing.T) {
		// "-N" at the end of one variable cannot take the next one's word.
		_, err := UserArgs([]string{"X", "Y"}, map[string]string{"X": "-N", "Y": "2"}, Policy{})
		require.Error(t, err)
		assert.Equal(t, "X: -N needs a value (-N VALUE)", err.Error())
	})
	t.Run("the failing variable is named", func(t *testing.T) {
		raw := map[string]string{"GOOD": "-N 1", "BAD": "--output=x"}
		_, err := UserArgs([]string{"GOOD", "BAD"}, raw, Policy{})
		require.Error(t, err)
		assert.Equal(t, "BAD: --output is set by ci-exec and cannot be changed (the output is streamed into this log)", err.Error())
	})
	t.Run("the policy applies to every variable", func(t *testing.T) {
		raw := map[string]string{"GOOD": "-N 1", "BAD": "-p debug"}
		_, err := UserArgs([]string{"GOOD", "BAD"}, raw, Policy{Denied: []string{"-p"}})
		require.Error(t, err)
		assert.Equal(t, "BAD: -p is not allowed by the runner's admin (denied options: -p/--partition)", err.Error())
	})
}

func TestUserArgsBadPolicy(t *testing.T) {
	tests := map[string]struct {
		policy Policy
		msg    string
	}{
		"abbreviated allowed": {policy: Policy{Allowed: []string{"--nodes", "--out"}},
			msg: `batch.allowed_flags: "--out" is not an sbatch option of Slurm 22.05 (write it in full, e.g. "--nodes" or "-N")`},
		"no dashes": {policy: Policy{Denied: []string{"nodes"}},
			msg: `batch.denied_flags: "nodes" is not an sbatch option of Slurm 22.05 (write it in full, e.g. "--nodes" or "-N")`},
		"short cluster": {policy: Policy{Denied: []string{"-QH"}},
			msg: `batch.denied_flags: "-QH" is not an sbatch option of Slurm 22.05 (write it in full, e.g. "--nodes" or "-N")`},
		"unknown short": {policy: Policy{Allowed: []string{"-X"}},
			msg: `batch.allowed_flags: "-X" is not an sbatch option of Slurm 22.05 (write it in full, e.g. "--nodes" or "-N")`},
		"empty": {policy: Policy{Denied: []string{""}},
			msg: `batch.denied_flags: "" is not an sbatch option of Slurm 22.05 (write it in full, e.g. "--nodes" or "-N")`},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			// Checked even when the user gives nothing: the config is wrong.
			for _, v := range []string{"", "-N 1"} {
				_, err := userArgs(v, tc.policy)
				require.Error(t, err)
				var ae *ArgError
				assert.False(t, errors.As(err, &ae), "a config error must not be an *ArgError")
				assert.Equal(t, tc.msg, err.Error())
			}
		})
	}
}

func TestCanonicalFlag(t *testing.T) {
	tests := map[string]struct {
		want string
		ok   bool
	}{
		"-N": {"nodes", true}, "--nodes": {"nodes", true}, "--nodes=2": {"nodes", true},
		"-H": {"hold", true}, "--no-kill": {"no-kill", true}, "-k": {"no-kill", true},
		"--out": {"", false}, "nodes": {"", false}, "-": {"", false}, "--": {"", false},
		"-NN": {"", false}, "-X": {"", false}, "---nodes": {"", false},
	}
	for in, tc := range tests {
		got, ok := canonicalFlag(in)
		assert.Equal(t, tc.ok, ok, in)
		assert.Equal(t, tc.want, got, in)
	}
}

func TestSbatchOptionsTable(t *testing.T) {
	longs, shorts := map[string]bool{}, map[byte]string{}
	for _, o := range sbatchOptions {
		assert.False(t, longs[o.long], "duplicate --%s", o.long)
		longs[o.long] = true
		if o.short != 0 {
			assert.Empty(t, shorts[o.short], "duplicate -%c", o.short)
			shorts[o.short] = o.long
		}
	}
	for name := range ownedOptions {
		assert.True(t, longs[name], "owned option --%s is not in the table", name)
	}
}

func TestCheckAdminOptions(t *testing.T) {
	tests := map[string]struct {
		options []string
		msg     string
	}{
		"nothing":             {},
		"fine":                {options: []string{"--partition=debug", "-N", "1", "--qos=normal", "--hold", "--nice"}},
		"one word with space": {options: []string{"-N 2"}},
		"owned long":          {options: []string{"--output=/tmp/x"}, msg: "batch.options: --output is set by ci-exec itself; remove it"},
		"owned short":         {options: []string{"-p", "debug", "-J", "x"}, msg: "batch.options: -J is set by ci-exec itself; remove it"},
		"owned in cluster":    {options: []string{"-QW"}, msg: "batch.options: -W is set by ci-exec itself; remove it"},
		"array":               {options: []string{"--array=1-2"}, msg: "batch.options: --array is set by ci-exec itself; remove it"},
		"clusters": {options: []string{"--partition=debug", "-M", "other"},
			msg: "batch.options: -M sends the job to another Slurm cluster, where ci-exec cannot follow or cancel it; remove it, and set SLURM_CONF in the runner's environment to submit to another cluster"},
		"positional": {options: []string{"--partition=debug", "job.sh"},
			msg: `batch.options: "job.sh" is not an sbatch option (only options may be given, no script, command or ':')`},
		"missing value": {options: []string{"--time"}, msg: "batch.options: --time needs a value (--time=VALUE)"},
		"abbreviation":  {options: []string{"--part=debug"}, msg: "batch.options: --part is not an sbatch option (write options in full, e.g. --partition)"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			err := CheckAdminOptions(tc.options)
			if tc.msg == "" {
				assert.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.Equal(t, tc.msg, err.Error())
		})
	}
}

func TestSbatchArgs(t *testing.T) {
	got := SbatchArgs(SubmitSpec{
		JobName:      "ci-7-build_script",
		Output:       "/scratch/ci/7/build.out",
		Chdir:        "/scratch/ci/7",
		AdminOptions: []string{"--partition=ci", "--time=1:00:00"},
		UserArgs:     []string{"-N", "2", "--time=0:30:00"},
	})
	assert.Equal(t, []string{
		"--no-requeue", "--export=ALL",
		"--partition=ci", "--time=1:00:00",
		"-N", "2", "--time=0:30:00",
		"--job-name=ci-7-build_script", "--output=/scratch/ci/7/build.out", "--chdir=/scratch/ci/7", "--parsable",
	}, got)

	t.Run("no options", func(t *testing.T) {
		got := SbatchArgs(SubmitSpec{JobName: "n", Output: "o", Chdir: "d"})
		assert.Equal(t, []string{"--no-requeue", "--export=ALL", "--job-name=n", "--output=o", "--chdir=d", "--parsable"}, got)
	})
}

func TestJobName(t *testing.T) {
	tests := []struct {
		id    int64
		stage string
		want  string
	}{
		{7, "build_script", "ci-7-build_script"},
		{123456789, "prepare-script", "ci-123456789-prepare-script"},
		{1, "step_script", "ci-1-step_script"},
		{1, "Release 2/3", "ci-1-Release_2_3"},
		{1, "a;rm -rf /", "ci-1-a_rm_-rf__"},
		{1, "bü\nild", "ci-1-b__ild"},
		{1, "$(id)", "ci-1-__id_"},
		{0, "", "ci-0-"},
	}
	for _, tc := range tests {
		assert.Equal(t, tc.want, JobName(tc.id, tc.stage), "%q", tc.stage)
	}
}
