//! Missing prerequisites: a test that cannot run here says why, and — where the run asked for
//! everything (`IGNIS_REQUIRE_ALL=1`, which `scripts/test.sh` and so CI set) — fails instead of
//! passing green by skipping.

/// The variable that turns every skip for a missing prerequisite into a failure.
pub const REQUIRE_ALL_ENV: &str = "IGNIS_REQUIRE_ALL";

/// Whether this run must have every prerequisite.
pub fn everything_required() -> bool {
    std::env::var(REQUIRE_ALL_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Report that `test` cannot run because `why` (a missing tool, privilege or cluster): panics
/// when [`everything_required`], else prints the reason so the skip is visible. Returns so the
/// caller can `return` from the test.
pub fn missing(test: &str, why: &str) {
    assert!(
        !everything_required(),
        "{test}: {why} ({REQUIRE_ALL_ENV} is set, so a missing prerequisite fails the test)"
    );
    eprintln!("SKIP {test}: {why}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_prerequisite_fails_only_when_everything_is_required() {
        // The variable is set only in a child process: parallel tests never see it change.
        let exe = std::env::current_exe().expect("current exe");
        let run = |require: Option<&str>| {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args([
                "testing::prerequisite::tests::child",
                "--exact",
                "--ignored",
            ])
            .env_remove(REQUIRE_ALL_ENV)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
            if let Some(v) = require {
                cmd.env(REQUIRE_ALL_ENV, v);
            }
            cmd.status().expect("run the child test").success()
        };
        assert!(run(None), "without the variable a missing tool only skips");
        assert!(run(Some("0")), "0 means not required");
        assert!(!run(Some("1")), "with the variable a missing tool fails");
    }

    #[test]
    #[ignore = "run by a_missing_prerequisite_fails_only_when_everything_is_required"]
    fn child() {
        missing("child", "a tool that is not here");
    }
}
