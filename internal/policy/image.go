package policy

import (
	"fmt"
	"regexp"
	"strings"

	"github.com/distribution/reference"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/failure"
)

// Ref is an image reference that passed validation. Only a Ref reaches a
// runtime's command line, so no unchecked user string ever does.
type Ref struct {
	// Given is the reference as the job or the admin wrote it.
	Given string
	// Full is the normalised form: registry/path:tag or registry/path@digest
	// ("alpine" is "docker.io/library/alpine:latest").
	Full string
	// Familiar is the short form that runtimes' own parsers expect
	// ("alpine:latest"; registry-qualified names stay whole).
	Familiar string
	// Registry is the host[:port] the image comes from ("docker.io" for
	// Docker Hub): the key for choosing credentials.
	Registry string
	// Digest is the pinned digest when the reference has one.
	Digest string
}

func (r Ref) String() string { return r.Full }

// maxRefLen bounds a reference; registries accept 255 for the name alone,
// and nothing legitimate comes close to this.
const maxRefLen = 512

// ParseImage validates and normalises an image reference. Anything that is
// not a plain reference (shell metacharacters, spaces, quotes, uppercase,
// "..", a scheme) is refused with a user error that says what to do: the
// reference later becomes an argument of the runtime's pull command, and
// the allowlist is only meaningful on a canonical name.
func ParseImage(s string) (Ref, error) {
	bad := func(why string) (Ref, error) {
		return Ref{}, failure.Userf("image %q is not a valid image reference (%s); use a plain name such as registry.example.com:5050/group/project/image:tag", s, why)
	}
	switch {
	case s == "":
		return bad("empty")
	case len(s) > maxRefLen:
		return Ref{}, failure.Userf("image reference is %d characters long, more than %d; use a shorter name", len(s), maxRefLen)
	case strings.ContainsAny(s, " \t\r\n\v\f"):
		return bad("it contains white space")
	case strings.ContainsAny(s, "'\"`$;&|<>()\\*?[]{}!#~%^,="):
		return bad("it contains shell or glob characters")
	case strings.Contains(s, "://"):
		return bad("leave out the scheme, e.g. https://")
	case strings.Contains(s, ".."):
		return bad(`".." is not allowed`)
	case strings.ToLower(s) != s && !hasOnlyTagUppercase(s):
		return bad("registry and repository names must be lowercase")
	}
	for _, r := range s {
		if r < 0x21 || r > 0x7e {
			return bad("only printable ASCII is allowed")
		}
	}
	named, err := reference.ParseNormalizedNamed(s)
	if err != nil {
		return bad(err.Error())
	}
	named = reference.TagNameOnly(named)
	ref := Ref{
		Given:    s,
		Full:     named.String(),
		Familiar: reference.FamiliarString(named),
		Registry: reference.Domain(named),
	}
	if c, ok := named.(reference.Canonical); ok {
		ref.Digest = c.Digest().String()
	}
	return ref, nil
}

// hasOnlyTagUppercase reports whether every uppercase letter in s is in its
// tag, which may legitimately contain uppercase ("v1.0-RC1").
func hasOnlyTagUppercase(s string) bool {
	name := s
	if i := strings.IndexByte(name, '@'); i >= 0 {
		name = name[:i]
	}
	if i := strings.LastIndexByte(name, ':'); i > strings.LastIndexByte(name, '/') {
		name = name[:i]
	}
	return strings.ToLower(name) == name
}

// Allowlist is the admin's image_allowlist, compiled. Each entry must match
// a whole reference: entries are anchored as ^(?:entry)$ so that
// "127\.0\.0\.1:5443/.*" cannot be satisfied by "127.0.0.1:5443.evil.com/x"
// or by a reference that merely contains it.
type Allowlist struct {
	// Key names the setting in messages ("general.charliecloud.image_allowlist").
	Key string
	res []*regexp.Regexp
	src []string
}

// NewAllowlist compiles the entries (an empty list allows every image).
func NewAllowlist(entries []string) (*Allowlist, error) {
	a := &Allowlist{Key: "image_allowlist", src: entries}
	for i, e := range entries {
		re, err := regexp.Compile(`^(?:` + e + `)$`)
		if err != nil {
			return nil, fmt.Errorf("image_allowlist[%d]: invalid regular expression %q: %v", i, e, err)
		}
		a.res = append(a.res, re)
	}
	return a, nil
}

// Check returns nil when ref is allowed. A reference is allowed when an
// entry matches its normalised form (docker.io/library/alpine:3.20), its
// familiar form (alpine:3.20) or its form as written: all three name the
// same image, so an admin may write entries either way.
func (a *Allowlist) Check(ref Ref) error {
	if a == nil || len(a.res) == 0 {
		return nil
	}
	for _, re := range a.res {
		if re.MatchString(ref.Full) || re.MatchString(ref.Familiar) || re.MatchString(ref.Given) {
			return nil
		}
	}
	if e, ok := a.prefixOnly(ref); ok {
		// Jacamar may accept an entry that matches part of a reference; an
		// entry that matches the reference's beginning was most likely
		// written that way. Say so, so the admin can widen it on purpose.
		return failure.Userf("image %s is not allowed on this runner: %s entry '%s' matches only its beginning, and ci-exec (unlike Jacamar) requires an entry to match the whole reference; use an allowed image, or ask the admin to end the entry with \".*\" if such images are meant",
			ref.Full, a.Key, e)
	}
	return failure.Userf("image %s is not allowed on this runner (it matches no entry of the admin's %s); use an allowed image or ask the admin to add it", ref.Full, a.Key)
}

// prefixOnly returns the first entry that matches the beginning of one of
// ref's forms but not the whole of it. It runs only for refused images.
func (a *Allowlist) prefixOnly(ref Ref) (string, bool) {
	for _, e := range a.src {
		re, err := regexp.Compile(`^(?:` + e + `)`)
		if err != nil {
			continue
		}
		if re.MatchString(ref.Full) || re.MatchString(ref.Familiar) || re.MatchString(ref.Given) {
			return e, true
		}
	}
	return "", false
}

// AtDigest is the reference pinned to digest ("registry/path@sha256:...").
func (r Ref) AtDigest(digest string) string {
	named, err := reference.ParseNormalizedNamed(r.Full)
	if err != nil {
		return r.Full // not reached: Full was made by ParseImage
	}
	return reference.TrimNamed(named).String() + "@" + digest
}

// FamiliarAtDigest is the short form pinned to digest, as runtimes' own
// parsers expect it ("alpine@sha256:...", "127.0.0.1:5443/ci/tiny@sha256:...").
func (r Ref) FamiliarAtDigest(digest string) string {
	named, err := reference.ParseNormalizedNamed(r.Full)
	if err != nil {
		return r.Full
	}
	return reference.FamiliarString(reference.TrimNamed(named)) + "@" + digest
}

// MatchRegistry reports whether registry (host[:port]) is in list, exactly
// (host names case-insensitively).
func MatchRegistry(list []string, registry string) bool {
	for _, r := range list {
		if auth.SameRegistry(registry, r) {
			return true
		}
	}
	return false
}
