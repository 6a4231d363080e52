package policy

import "testing"

func TestPlace(t *testing.T) {
	plain := PlacementPolicy{HasJobImage: true}
	runner := PlacementPolicy{HasJobImage: true, HasRunnerImage: true}
	stepOnly := PlacementPolicy{HasJobImage: true, HasRunnerImage: true, StepScriptOnly: true}
	noImage := PlacementPolicy{HasRunnerImage: true}
	tests := []struct {
		policy PlacementPolicy
		stage  string
		want   Placement
	}{
		{plain, "build_script", InJobImage},
		{plain, "step_release", InJobImage},
		{plain, "step_run", InJobImage},
		{plain, "after_script", InJobImage},
		{plain, "some_future_stage", InJobImage},
		{plain, "boot_verify_probes", InJobImage},
		{plain, "get_sources", OnHost},
		{plain, "prepare_script", OnHost},
		{plain, "upload_artifacts_on_failure", OnHost},
		{plain, "cleanup_file_variables", OnHost},

		{runner, "get_sources", InRunnerImage},
		{runner, "restore_cache", InRunnerImage},
		{runner, "archive_cache_on_failure", InRunnerImage},
		{runner, "build_script", InJobImage},
		{runner, "after_script", InJobImage},

		{stepOnly, "build_script", InJobImage},
		{stepOnly, "step_release", InJobImage},
		{stepOnly, "unknown_thing", InJobImage},
		{stepOnly, "after_script", OnHost},
		{stepOnly, "get_sources", OnHost},
		{stepOnly, "upload_artifacts_on_success", OnHost},

		// A job without an image runs wholly on the host.
		{noImage, "build_script", OnHost},
		{noImage, "after_script", OnHost},
		{noImage, "get_sources", OnHost},
	}
	for _, tc := range tests {
		if got := tc.policy.Place(tc.stage); got != tc.want {
			t.Errorf("%+v.Place(%q) = %v, want %v", tc.policy, tc.stage, got, tc.want)
		}
	}
}
