package config

// Template runtimes (docs/templates.md): an admin describes a container
// runtime as argv templates in `[runtimes.NAME]` and selects it with
// run_mechanism = "template:NAME". The policy keys are those of the
// built-in tables (the embedded Mechanism); the rest says how to run the
// runtime's programs. Everything here is checked at load time, so a
// template that cannot serve the placement the configuration asks for
// (a placeholder without its fragment, a setup without its teardown, user
// volumes without a bind fragment...) is refused before any job runs.

import (
	"fmt"
	"regexp"
	"sort"
	"strings"
)

// TemplatePrefix starts a run_mechanism value that names a template.
const TemplatePrefix = "template:"

// Template is one `[runtimes.NAME]` table.
type Template struct {
	// Mechanism holds the policy keys, with the meaning they have in
	// [general.podman] (image_allowlist, volume_prefixes, ...).
	Mechanism

	// The wrap actions: argv templates (see docs/templates.md). Run is
	// required, and one of Pull and Check; the others are optional.
	Version  []string `toml:"version"`
	Check    []string `toml:"check"`
	Pull     []string `toml:"pull"`
	Setup    []string `toml:"setup"`
	Run      []string `toml:"run"`
	Teardown []string `toml:"teardown"`
	Remove   []string `toml:"remove"`
	// FindShell runs {probe} (a fixed /bin/sh script) in the image once per
	// digest: its answer (bash when the image has it) runs the stages.
	FindShell []string `toml:"find_shell"`

	// The fragments: what one list item expands to.
	Bind     []string `toml:"bind"`
	BindRO   []string `toml:"bind_ro"`
	EnvName  []string `toml:"env_name"`
	EnvValue []string `toml:"env_value"`
	Auth     []string `toml:"auth"`
	Insecure []string `toml:"insecure"`
	Rootless []string `toml:"rootless"`

	// ImageEnv are container variables left to the image's own
	// environment (its ENV), never set by ci-exec: PATH for runtimes that
	// apply the image's ENV, as the built-in Podman does.
	ImageEnv []string `toml:"image_env"`
	// CommandEnv is KEY=VALUE settings of every action's environment
	// (VALUE may use the common scalar placeholders).
	CommandEnv []string `toml:"command_env"`
	// UsernameEnv and PasswordEnv name the pull's environment variables
	// that get the registry credential (e.g. APPTAINER_DOCKER_USERNAME).
	UsernameEnv string `toml:"username_env"`
	PasswordEnv string `toml:"password_env"`
	// UsernameVariable and PasswordVariable are the job variables with the
	// user's own registry credentials.
	UsernameVariable string `toml:"username_variable"`
	PasswordVariable string `toml:"password_variable"`
	// UserArgsVariable is the job variable with the user's run arguments;
	// UserFlags is the run command's flags users may pass ("-e/--env=":
	// takes a value, "--read-only": a switch, "--opt[=]": optional value).
	UserArgsVariable string   `toml:"user_args_variable"`
	UserFlags        []string `toml:"user_flags"`
	// Shell runs stage scripts in the image (default /bin/sh).
	Shell string `toml:"shell"`
	// ErrorExitCodes are the run command's own failure codes; the last
	// stderr line starting with ErrorPrefix is then the runtime's message.
	ErrorExitCodes []int  `toml:"error_exit_codes"`
	ErrorPrefix    string `toml:"error_prefix"`
	// HelperProcesses are the runtime's own process names that outlive
	// its commands by design (rootless Podman's catatonit).
	HelperProcesses []string `toml:"helper_processes"`
}

// Placeholder scopes: which action (or fragment) may use which name.
const (
	actVersion  = "version"
	actCheck    = "check"
	actPull     = "pull"
	actSetup    = "setup"
	actRun      = "run"
	actTeardown = "teardown"
	actRemove   = "remove"
	actShell    = "find_shell"
)

// Scalar placeholders replace {name} anywhere in a word.
var (
	// commonScalars are known in every action and in command_env.
	commonScalars = []string{"storage", "run_dir", "tmp_dir", "user", "uid", "home"}
	// imageScalars are known where there is an image of the job.
	imageScalars = []string{"ref", "registry", "repository", "digest", "image", "job_key"}
)

// TemplateScalars returns the scalar placeholders of an action.
func TemplateScalars(action string) []string {
	s := append([]string(nil), commonScalars...)
	switch action {
	case actVersion:
		return s
	case actRemove:
		return append(s, "ref", "registry", "repository", "digest", "image")
	case actPull:
		return append(append(s, imageScalars...), "image_file")
	case actRun:
		return append(append(s, imageScalars...), "workdir", "shell")
	}
	return append(s, imageScalars...)
}

// TemplateLists returns the list placeholders (a whole word, expanding to
// any number of words) of an action.
func TemplateLists(action string) []string {
	switch action {
	case actRun:
		return []string{"binds", "env", "admin_options", "user_args", "command", "rootless"}
	case actShell:
		return []string{"probe", "rootless"}
	case actPull, actCheck:
		return []string{"auth", "insecure", "rootless"}
	}
	return []string{"rootless"}
}

// fragmentScalars are the item placeholders of each fragment (besides the
// common scalars).
var fragmentScalars = map[string][]string{
	"bind": {"src", "dst"}, "bind_ro": {"src", "dst"}, "env_name": {"name"}, "env_value": {"name", "value"},
	"auth": {"authfile"}, "insecure": nil, "rootless": nil,
}

// listFragments is the fragment each list placeholder needs.
var listFragments = map[string][]string{
	"binds": {"bind"}, "env": {"env_name"}, "auth": {"auth"}, "insecure": {"insecure"}, "rootless": {"rootless"},
}

var placeholderRE = regexp.MustCompile(`\{([a-z_]*)\}?`)

// TemplatePlaceholders returns the placeholders a word uses, and an error
// for braces that are not a placeholder ("{", "{Image}"); "{{" and "}}"
// stand for a literal brace.
func TemplatePlaceholders(word string) ([]string, error) {
	w := strings.NewReplacer("{{", "", "}}", "").Replace(word)
	var names []string
	for _, m := range placeholderRE.FindAllStringSubmatch(w, -1) {
		if !strings.HasSuffix(m[0], "}") || m[1] == "" {
			return nil, fmt.Errorf("%q has a '{' that starts no placeholder (write {{ for a literal brace)", word)
		}
		names = append(names, m[1])
	}
	if rest := placeholderRE.ReplaceAllString(w, ""); strings.Contains(rest, "}") {
		return nil, fmt.Errorf("%q has a '}' that ends no placeholder (write }} for a literal brace)", word)
	}
	return names, nil
}

// flagSpec is one user_flags entry: -e/--env=, --read-only, --opt[=].
var flagSpec = regexp.MustCompile(`^(-[A-Za-z0-9]/)?(--[A-Za-z0-9][A-Za-z0-9-]*|-[A-Za-z0-9])(=|\[=\])?$`)

// templateNameRE is a [runtimes] table name.
var templateNameRE = regexp.MustCompile(`^[a-z][a-z0-9-]{0,31}$`)

// TemplateName returns the template run_mechanism names, or "".
func (g General) TemplateName() string {
	name, ok := strings.CutPrefix(g.RunMechanism, TemplatePrefix)
	if !ok {
		return ""
	}
	return name
}

// validateTemplates checks every [runtimes.NAME] table, and the one
// run_mechanism names against the placement the configuration asks for.
func (c *Config) validateTemplates(add func(string, ...any)) {
	names := make([]string, 0, len(c.Runtimes))
	for n := range c.Runtimes {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if !templateNameRE.MatchString(n) {
			add("runtimes.%s: a template name must be lower-case letters, digits and '-', starting with a letter", n)
			continue
		}
		c.Runtimes[n].validate("runtimes."+n, c.IsBatch() && c.General.TemplateName() == n, add)
	}
	if n := c.General.TemplateName(); n != "" && c.Runtimes[n] == nil {
		add("general.run_mechanism %q names no template; define it in a [runtimes.%s] table", c.General.RunMechanism, n)
	}
}

func (t *Template) validate(prefix string, batch bool, add func(string, ...any)) {
	t.Mechanism.validate(prefix, add)
	for _, k := range []struct {
		key string
		v   []string
	}{{"runner_entry_point", t.RunnerEntryPoint}, {"user_entry_point", t.UserEntryPoint}} {
		if len(k.v) > 0 {
			add("%s.%s is a Podman setting; put the entry point in the run template instead", prefix, k.key)
		}
	}
	// convert, disable_convert and cache_dir change nothing, as for the
	// built-in Podman: a template's image is what its pull makes.

	// The actions the placement needs: every container stage runs with
	// run, and needs an image that pull makes or check finds.
	if len(t.Run) == 0 {
		add("%s.run is required: the argv that runs a stage in the image", prefix)
	}
	if len(t.Pull) == 0 && len(t.Check) == 0 {
		add("%s needs pull or check: how the image gets to this host (or how to see that it is there)", prefix)
	}
	if len(t.Setup) > 0 && len(t.Teardown) == 0 {
		add("%s.setup needs a teardown: what setup makes for a job must be removed at cleanup", prefix)
	}
	if batch && len(t.Setup) > 0 {
		add("%s.setup makes per-job state on the host where prepare runs, but executor = \"slurm\" runs stages on compute nodes; remove setup or use the shell executor", prefix)
	}
	if (t.CacheMaxSize.Bytes > 0 || t.CacheMaxAge.Duration > 0) && len(t.Remove) == 0 {
		add("%s: cache_max_size and cache_max_age need a remove action (how to delete an evicted image)", prefix)
	}

	used := map[string]bool{}
	actions := []struct {
		name string
		argv []string
	}{{actVersion, t.Version}, {actCheck, t.Check}, {actPull, t.Pull}, {actSetup, t.Setup},
		{actRun, t.Run}, {actTeardown, t.Teardown}, {actRemove, t.Remove}, {actShell, t.FindShell}}
	for _, a := range actions {
		t.checkAction(prefix, a.name, a.argv, used, add)
	}
	if len(t.Run) > 0 {
		// What every stage in a container needs, and what the policy keys
		// promise: a run template that left one out would silently drop it.
		need := []string{"image", "command", "binds", "env", "workdir"}
		if len(t.Setup) > 0 {
			need[0] = "job_key" // the per-job instance setup made
		}
		if len(t.CustomOptions) > 0 || len(t.RunnerOptions) > 0 {
			need = append(need, "admin_options")
		}
		if !t.DisableUserArgs {
			need = append(need, "user_args")
		}
		for _, n := range need {
			if !used["run."+n] {
				add("%s.run must use {%s}%s", prefix, n, runNeedWhy[n])
			}
		}
	}
	if len(t.FindShell) > 0 && (!used["find_shell.probe"] || !used["find_shell.image"]) {
		add("%s.find_shell must use {image} and {probe} (the fixed script that prints the image's shell)", prefix)
	}
	if len(t.FindShell) > 0 && t.Shell != "" {
		add("%s: set shell or find_shell, not both", prefix)
	}
	if len(t.Pull) > 0 && !used["pull.ref"] && !used["pull.digest"] {
		add("%s.pull must use {ref} or {digest}: ci-exec pulls exactly the resolved digest", prefix)
	}
	if !t.DisableUserArgs {
		if t.UserArgsVariable == "" || !envName.MatchString(t.UserArgsVariable) {
			add("%s.user_args_variable must name the job variable with the user's run arguments (or set disable_user_args = true), got %q", prefix, t.UserArgsVariable)
		}
		if len(t.UserFlags) == 0 {
			add("%s.user_flags must list the run flags users may pass, e.g. [\"-e/--env=\"] (or set disable_user_args = true)", prefix)
		}
	}
	described := map[string]bool{}
	for _, f := range t.UserFlags {
		if m := flagSpec.FindStringSubmatch(f); m != nil {
			described[m[2]] = true
			described[strings.TrimSuffix(m[1], "/")] = true
		}
	}
	for _, f := range t.AllowedUserArgs {
		if strings.HasPrefix(f, "-") && !described[f] {
			add("%s.allowed_user_args: %q is not in user_flags; describe its shape there first (e.g. \"%s=\")", prefix, f, f)
		}
	}
	for _, f := range t.UserFlags {
		if !flagSpec.MatchString(f) {
			add("%s.user_flags: %q is not a flag spec (\"-e/--env=\" takes a value, \"--read-only\" is a switch, \"--opt[=]\" an optional value)", prefix, f)
		}
	}

	// Fragments: each one used by its list placeholder, and each list
	// placeholder given its fragment, so nothing is half wired.
	frags := map[string][]string{"bind": t.Bind, "bind_ro": t.BindRO, "env_name": t.EnvName, "env_value": t.EnvValue,
		"auth": t.Auth, "insecure": t.Insecure, "rootless": t.Rootless}
	fragUsed := map[string]bool{}
	for list, fs := range listFragments {
		for k := range used {
			if strings.HasSuffix(k, "."+list) {
				for _, f := range fs {
					fragUsed[f] = true
					if len(frags[f]) == 0 {
						add("%s.%s uses {%s} but %s.%s is not defined", prefix, strings.TrimSuffix(k, "."+list), list, prefix, f)
					}
				}
			}
		}
	}
	if used["run.binds"] {
		fragUsed["bind_ro"] = true
	}
	if used["run.env"] {
		fragUsed["env_value"] = true
	}
	for _, f := range []string{"bind", "bind_ro", "env_name", "env_value", "auth", "insecure", "rootless"} {
		words := frags[f]
		if len(words) > 0 && !fragUsed[f] {
			add("%s.%s is defined but no action uses the list placeholder that expands it", prefix, f)
		}
		allowed := append(append([]string(nil), commonScalars...), fragmentScalars[f]...)
		for _, w := range words {
			t.checkWord(prefix+"."+f, w, allowed, nil, nil, add)
		}
	}
	for _, w := range []string{"{src}", "{dst}"} {
		for _, f := range []string{"bind", "bind_ro"} {
			if len(frags[f]) > 0 && !strings.Contains(strings.Join(frags[f], " "), w) {
				add("%s.%s must use %s", prefix, f, w)
			}
		}
	}
	if len(t.EnvName) > 0 && !strings.Contains(strings.Join(t.EnvName, " "), "{name}") {
		add("%s.env_name must use {name}: the variable's value is in the command's environment, never on its command line", prefix)
	}
	if len(t.Auth) > 0 && !strings.Contains(strings.Join(t.Auth, " "), "{authfile}") {
		add("%s.auth must use {authfile}", prefix)
	}
	if len(t.InsecureRegistries) > 0 && !used["pull.insecure"] && !used["check.insecure"] {
		add("%s.insecure_registries needs {insecure} in pull: how the runtime skips TLS verification", prefix)
	}
	if t.UserVolumeVariable != "" && len(t.Bind) == 0 {
		add("%s.user_volume_variable needs a bind fragment", prefix)
	}

	for i, kv := range t.CommandEnv {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || !envName.MatchString(k) {
			add("%s.command_env[%d]: %q is not KEY=VALUE", prefix, i, kv)
			continue
		}
		t.checkWord(fmt.Sprintf("%s.command_env[%d]", prefix, i), v, commonScalars, nil, nil, add)
	}
	for _, n := range t.ImageEnv {
		if !envName.MatchString(n) {
			add("%s.image_env: %q is not a variable name", prefix, n)
		}
	}
	for _, e := range []struct{ key, v string }{{"username_env", t.UsernameEnv}, {"password_env", t.PasswordEnv},
		{"username_variable", t.UsernameVariable}, {"password_variable", t.PasswordVariable}} {
		if e.v != "" && !envName.MatchString(e.v) {
			add("%s.%s: %q is not a variable name", prefix, e.key, e.v)
		}
	}
	if (t.UsernameEnv == "") != (t.PasswordEnv == "") {
		add("%s: set both username_env and password_env, or neither", prefix)
	}
	if (t.UsernameVariable == "") != (t.PasswordVariable == "") {
		add("%s: set both username_variable and password_variable, or neither", prefix)
	}
	// A pull without auth and username_env is anonymous (runtimes that
	// read credentials only from their own files); Pull says so in the
	// job log when the job has credentials for the image.
	switch t.Shell {
	case "", "/bin/sh", "/usr/bin/sh", "/bin/bash", "/usr/bin/bash":
	default:
		add("%s.shell must be /bin/sh, /usr/bin/sh, /bin/bash or /usr/bin/bash, got %q", prefix, t.Shell)
	}
	for _, c := range t.ErrorExitCodes {
		if c < 1 || c > 255 {
			add("%s.error_exit_codes: %d is not an exit code (1-255)", prefix, c)
		}
	}
	if len(t.ErrorExitCodes) > 0 && t.ErrorPrefix == "" {
		add("%s.error_exit_codes needs error_prefix: how the runtime's own error lines start (e.g. \"Error:\")", prefix)
	}
	for _, p := range t.HelperProcesses {
		if p == "" || len(p) > 15 || strings.ContainsAny(p, "/ \t") {
			add("%s.helper_processes: %q is not a process name (at most 15 characters, as in /proc/PID/comm)", prefix, p)
		}
	}
}

var runNeedWhy = map[string]string{
	"image":         ": the image prepare made ready",
	"job_key":       ": the per-job instance setup made",
	"command":       ": the stage's command (the image's shell and the script)",
	"binds":         ": the job's builds, cache and scripts dirs, and the user's admitted volumes",
	"env":           ": the container's environment (HOME, USER, pass_env)",
	"workdir":       ": the stage's working directory",
	"admin_options": ": custom_options or runner_options are set",
	"user_args":     ": user arguments are allowed (or set disable_user_args = true)",
}

// checkAction checks one action's words and records what it uses in used
// ("run.binds").
func (t *Template) checkAction(prefix, action string, argv []string, used map[string]bool, add func(string, ...any)) {
	if len(argv) == 0 {
		return
	}
	key := prefix + "." + action
	if ph, _ := TemplatePlaceholders(argv[0]); len(ph) > 0 || argv[0] == "" || strings.Contains(argv[0], " ") {
		add("%s[0] must be a program name or absolute path without placeholders or spaces, got %q", key, argv[0])
	}
	if strings.Contains(argv[0], "/") && !strings.HasPrefix(argv[0], "/") {
		add("%s[0] must be a program name or an absolute path, got %q", key, argv[0])
	}
	for _, w := range argv[1:] {
		t.checkWord(key, w, TemplateScalars(action), TemplateLists(action), func(n string) { used[action+"."+n] = true }, add)
	}
}

// checkWord checks one word against the scalar and list placeholders a
// place may use; a list placeholder must be the whole word.
func (t *Template) checkWord(key, w string, scalars, lists []string, use func(string), add func(string, ...any)) {
	if strings.ContainsRune(w, 0) {
		add("%s: %q contains a NUL byte", key, w)
		return
	}
	names, err := TemplatePlaceholders(w)
	if err != nil {
		add("%s: %v", key, err)
		return
	}
	for _, n := range names {
		switch {
		case contains(lists, n):
			if w != "{"+n+"}" {
				add("%s: {%s} is a list (it expands to several words) and must be a word of its own, not part of %q", key, n, w)
			}
		case contains(scalars, n):
		default:
			add("%s: unknown placeholder {%s} here (known: %s)", key, n, strings.Join(braced(append(append([]string(nil), scalars...), lists...)), ", "))
			continue
		}
		if use != nil {
			use(n)
		}
	}
}

func contains(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

func braced(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = "{" + s + "}"
	}
	return out
}
