// Package mechtest is test support for the container runtimes in
// internal/mechanism/charliecloud and internal/mechanism/apptainer: what
// both test suites need, written once and parameterised where the
// runtimes differ. Only their _test.go files import it; production code
// must not.
//
//   - StartRegistry: a fake registry that answers the manifest HEAD
//     requests of tag resolution, optionally behind basic authentication,
//     over HTTPS with a self-signed certificate (SelfSignedTLS:
//     Charliecloud, which reaches insecure registries with
//     registry.Options{SkipVerify: true}) or over plain HTTP (PlainHTTP:
//     Apptainer, registry.Options{PlainHTTP: true}); ClosedPort and
//     ParsedRef for references without one.
//   - Creds and Secrets: credentials chosen by auth.Choose from a
//     runtime's own variable names, and the checks that no secret leaks.
//   - Fake: a fake installation of a runtime (application_path with fake
//     programs, the record dir they read and write, image storage, the
//     user's store) and readers of what the fake programs recorded; each
//     runtime's own fake embeds it.
//   - Suite: the pull scenarios both runtimes must pass, with hooks for
//     what each checks of its own way of keeping images.
//   - Table runners for what both runtimes test alike: CommandErrors and
//     SpecErrors (kit.CheckSpec), Diagnoses, Versions,
//     DefaultUserArgs, StorageDirs.
package mechtest
