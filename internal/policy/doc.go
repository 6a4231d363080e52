// Package policy is the admin's rules for what a job may ask for, as pure,
// table-tested functions of the configuration and the job's variables:
//
//   - image references: validation and normalisation (ParseImage), the
//     allowlist (Allowlist), the registries a pull may reach without TLS
//     checks (MatchRegistry); all checked before any network access;
//   - stage placement: job image, runner image or host (PlacementPolicy);
//   - user volumes under admin prefixes (VolumePolicy);
//   - user runtime arguments, split without a shell and checked flag by
//     flag against an allowlist (UserArgsPolicy, FlagTable).
//
// Nothing here does I/O except resolving a volume's symlinks, and nothing
// here is remembered between stages: the stages recompute policy from the
// config in each one, so no file a job can write widens it.
package policy
