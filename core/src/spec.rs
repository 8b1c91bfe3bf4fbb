//! Validation of job specs.
//!
//! Both the coordinator (on submit) and the agent (on assignment) validate, so a spec that
//! reaches an executor is always well formed, whoever sent it. The kind and env mode are
//! already typed by decoding; what is checked here is what types cannot say.

use std::time::Duration;

use crate::{JobKind, JobSpec};

pub const MAX_CARGO_ARGS: usize = 256;
pub const MAX_ARG_BYTES: usize = 4096;
pub const MAX_ENV_VARS: usize = 64;
pub const MAX_LABELS: usize = 32;
/// A day: a longer job is a mistake, not a build.
pub const MAX_TIMEOUT_SECS: u32 = 24 * 60 * 60;

/// Environment variables a client may set for a job. Everything else comes from the agent's
/// own environment, so a client cannot redirect `PATH`, `HOME` or the cargo home of a host.
pub const ENV_ALLOWLIST: &[&str] = &[
    "RUST_BACKTRACE",
    "RUST_LOG",
    "RUST_TEST_THREADS",
    "RUST_MIN_STACK",
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_TERM_COLOR",
    "CARGO_INCREMENTAL",
    "CARGO_BUILD_JOBS",
    // nextest's machine-readable test results (`--message-format libtest-json-plus`).
    "NEXTEST_EXPERIMENTAL_LIBTEST_JSON",
];

/// Prefixes of allowed environment variable names.
pub const ENV_ALLOWED_PREFIXES: &[&str] = &["CARGO_PROFILE_"];

/// Arguments the agent owns: the target directory is what keeps a workspace warm.
const FORBIDDEN_ARGS: &[&str] = &["--target-dir"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid job spec: {0}")]
pub struct SpecError(pub String);

fn invalid(message: impl Into<String>) -> SpecError {
    SpecError(message.into())
}

/// Whether a client may set this environment variable for a job.
pub fn env_name_allowed(name: &str) -> bool {
    ENV_ALLOWLIST.contains(&name) || ENV_ALLOWED_PREFIXES.iter().any(|p| name.starts_with(p))
}

fn check_text(what: &str, value: &str) -> Result<(), SpecError> {
    if value.len() > MAX_ARG_BYTES {
        return Err(invalid(format!(
            "{what} is longer than {MAX_ARG_BYTES} bytes"
        )));
    }
    if value.contains('\0') {
        return Err(invalid(format!("{what} contains a NUL byte")));
    }
    Ok(())
}

fn check_label(label: &str) -> Result<(), SpecError> {
    let ok = !label.is_empty()
        && label.len() <= 128
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:=/".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "label {label:?} must be 1-128 characters of [A-Za-z0-9-_.:=/]"
        )))
    }
}

/// Validates labels an agent advertises or a job requires.
pub fn validate_labels(labels: &[String]) -> Result<(), SpecError> {
    if labels.len() > MAX_LABELS {
        return Err(invalid(format!("more than {MAX_LABELS} labels")));
    }
    labels.iter().try_for_each(|l| check_label(l))
}

/// Checks a job spec; see the module documentation.
pub fn validate(spec: &JobSpec) -> Result<(), SpecError> {
    if spec.cargo_args.len() > MAX_CARGO_ARGS {
        return Err(invalid(format!(
            "more than {MAX_CARGO_ARGS} cargo arguments"
        )));
    }
    // Arguments after a bare `--` belong to the test binary or to clippy-driver, not cargo.
    let cargo_own = spec
        .cargo_args
        .iter()
        .position(|a| a == "--")
        .unwrap_or(spec.cargo_args.len());
    for (index, arg) in spec.cargo_args.iter().enumerate() {
        check_text("cargo argument", arg)?;
        if index >= cargo_own {
            continue;
        }
        let flag = arg.split('=').next().unwrap_or(arg);
        if FORBIDDEN_ARGS.contains(&flag) {
            return Err(invalid(format!(
                "{flag} is not allowed: the agent owns the target directory so builds stay warm"
            )));
        }
        if flag == "--manifest-path" {
            let path = arg
                .strip_prefix("--manifest-path=")
                .or_else(|| spec.cargo_args.get(index + 1).map(String::as_str))
                .unwrap_or("");
            if path.starts_with('/') || path.split('/').any(|part| part == "..") {
                return Err(invalid(
                    "--manifest-path must be a relative path inside the repository",
                ));
            }
        }
    }
    if spec.env.len() > MAX_ENV_VARS {
        return Err(invalid(format!(
            "more than {MAX_ENV_VARS} environment variables"
        )));
    }
    for var in &spec.env {
        if !env_name_allowed(&var.name) {
            return Err(invalid(format!(
                "environment variable {:?} is not allowed; allowed are {} and {}*",
                var.name,
                ENV_ALLOWLIST.join(", "),
                ENV_ALLOWED_PREFIXES.join("*, ")
            )));
        }
        check_text("environment value", &var.value)?;
    }
    if spec.timeout.is_some_and(|timeout| {
        timeout.is_zero() || timeout > Duration::from_secs(u64::from(MAX_TIMEOUT_SECS))
    }) {
        return Err(invalid(format!(
            "timeout must be 1..={MAX_TIMEOUT_SECS} seconds"
        )));
    }
    if spec.collect_executables {
        if !matches!(spec.kind, JobKind::Build | JobKind::Test) {
            return Err(invalid(
                "executables are collected only from build and test jobs",
            ));
        }
        // The agent reads cargo's JSON messages to find the executables.
        if spec
            .cargo_args
            .iter()
            .take(cargo_own)
            .any(|arg| arg.starts_with("--message-format"))
        {
            return Err(invalid(
                "--message-format cannot be combined with collecting executables",
            ));
        }
    }
    if spec.archive_from.is_some() && spec.kind != JobKind::Nextest {
        return Err(invalid("only nextest jobs run from an archive"));
    }
    validate_labels(&spec.required_labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EnvVar;

    fn spec(args: &[&str]) -> JobSpec {
        JobSpec {
            cargo_args: args.iter().map(|a| (*a).to_owned()).collect(),
            ..JobSpec::new(JobKind::Test)
        }
    }

    #[test]
    fn accepts_ordinary_cargo_arguments() {
        assert_eq!(validate(&spec(&["-p", "app", "--", "--nocapture"])), Ok(()));
        assert_eq!(
            validate(&spec(&["--manifest-path", "crates/a/Cargo.toml"])),
            Ok(())
        );
    }

    #[test]
    fn executables_come_only_from_build_and_test_jobs_in_cargo_json() {
        let collect = |kind, args: &[&str]| JobSpec {
            collect_executables: true,
            kind,
            ..spec(args)
        };
        assert_eq!(validate(&collect(JobKind::Build, &[])), Ok(()));
        assert_eq!(validate(&collect(JobKind::Test, &["--no-run"])), Ok(()));
        assert!(validate(&collect(JobKind::Clippy, &[])).is_err());
        let own_format = collect(JobKind::Build, &["--message-format=json"]);
        assert!(validate(&own_format).is_err());
        // After `--` it is the test binary's argument, not cargo's.
        let passed_on = collect(JobKind::Test, &["--", "--message-format"]);
        assert_eq!(validate(&passed_on), Ok(()));
    }

    #[test]
    fn rejects_owned_arguments_and_absurd_timeouts() {
        let mut forever = spec(&[]);
        forever.timeout = Some(Duration::from_secs(u64::from(MAX_TIMEOUT_SECS) + 1));
        assert!(validate(&forever).is_err());
        forever.timeout = Some(Duration::ZERO);
        assert!(validate(&forever).is_err());
        assert!(validate(&spec(&["--target-dir", "/tmp/x"])).is_err());
        assert!(validate(&spec(&["--target-dir=/tmp/x"])).is_err());
        assert!(validate(&spec(&["--manifest-path", "/etc/Cargo.toml"])).is_err());
        assert!(validate(&spec(&["--manifest-path=../x/Cargo.toml"])).is_err());
        assert!(validate(&spec(&["a\0b"])).is_err());
        // After `--` the arguments are the test binary's.
        assert_eq!(validate(&spec(&["--", "--target-dir"])), Ok(()));
    }

    #[test]
    fn only_allowlisted_environment_passes() {
        let mut with_env = spec(&[]);
        with_env.env.push(EnvVar {
            name: "RUST_BACKTRACE".into(),
            value: "1".into(),
        });
        with_env.env.push(EnvVar {
            name: "CARGO_PROFILE_DEV_DEBUG".into(),
            value: "0".into(),
        });
        assert_eq!(validate(&with_env), Ok(()));
        with_env.env.push(EnvVar {
            name: "PATH".into(),
            value: "/evil".into(),
        });
        let error = validate(&with_env).expect_err("PATH is not allowed");
        assert!(error.to_string().contains("PATH"), "{error}");
    }

    #[test]
    fn labels_are_restricted() {
        assert!(validate_labels(&["x86_64-linux".into(), "gpu".into()]).is_ok());
        assert!(validate_labels(&["has space".into()]).is_err());
        assert!(validate_labels(&[String::new()]).is_err());
    }
}

/// Hostile input: validation answers every spec, however odd, without panicking, and what
/// it accepts keeps the rules it promises.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::EnvVar;

    fn any_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "\\PC{0,40}",
            Just("--target-dir".to_owned()),
            Just("--target-dir=/x".to_owned()),
            Just("--manifest-path".to_owned()),
            Just("--".to_owned()),
            Just("../x/Cargo.toml".to_owned()),
            Just("a\0b".to_owned()),
        ]
    }

    proptest! {
        #[test]
        fn validation_never_panics_and_keeps_its_promises(
            args in proptest::collection::vec(any_text(), 0..12),
            env in proptest::collection::vec((any_text(), any_text()), 0..4),
            labels in proptest::collection::vec(any_text(), 0..4),
            timeout in proptest::option::of(0u64..200_000),
        ) {
            let spec = JobSpec {
                cargo_args: args,
                env: env.into_iter().map(|(name, value)| EnvVar { name, value }).collect(),
                timeout: timeout.map(Duration::from_secs),
                required_labels: labels,
                ..JobSpec::new(JobKind::Build)
            };
            if validate(&spec).is_ok() {
                let own = spec.cargo_args.iter().take_while(|arg| *arg != "--");
                for arg in own {
                    prop_assert!(!arg.starts_with("--target-dir"), "{arg}");
                }
                prop_assert!(spec.env.iter().all(|var| env_name_allowed(&var.name)));
                prop_assert!(spec.cargo_args.iter().all(|arg| !arg.contains('\0')));
            }
        }
    }
}
