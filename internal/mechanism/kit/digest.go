package kit

import (
	"context"

	"github.com/ci-exec/ci-exec/internal/auth"
	"github.com/ci-exec/ci-exec/internal/config"
	"github.com/ci-exec/ci-exec/internal/failure"
	"github.com/ci-exec/ci-exec/internal/imagecache"
	"github.com/ci-exec/ci-exec/internal/mechanism"
	"github.com/ci-exec/ci-exec/internal/registry"
)

// ResolveDigest finds the manifest digest the job's image means, by the
// pull policy (the same for every runtime):
//   - a reference pinned to a digest is that digest;
//   - "always": the registry is asked, with the pull's credentials, so a
//     tag pushed again is picked up, and an unchanged one costs one HEAD
//     request instead of a pull;
//   - "if-not-present": the digest the tag had at its last pull, while that
//     image is still present; else the registry is asked;
//   - "never": the digest of the last pull, and the image must be present.
//
// present reports whether the runtime already has a digest.
func ResolveDigest(ctx context.Context, st *imagecache.Store, req mechanism.PullRequest, names auth.VariableNames, o registry.Options, present func(digest string) bool) (string, error) {
	digest := req.Ref.Digest
	if digest == "" && req.Policy != config.PullAlways {
		if d := st.Tag(req.Ref.Full); d != "" && present(d) {
			digest = d
		}
	}
	if digest == "" && req.Policy != config.PullNever {
		d, err := registry.Digest(ctx, req.Ref.Full, req.Credential, o)
		if err != nil {
			return "", DigestError(err, req.Ref.Full, req.Credential, names)
		}
		digest = d
	}
	if req.Policy == config.PullNever && (digest == "" || !present(digest)) {
		return "", failure.Userf("image %s is not in your image store and the pull policy is %q; ask the admin, or pull it once in a job with another policy",
			req.Ref.Full, config.PullNever)
	}
	return digest, nil
}
