//! Why a build failed: [`EngineError`], with the typed cause of a failed instruction kept as
//! its [`source`](std::error::Error::source) ([`StepCause`]) and the line it failed on.

use crate::{
    engine::{
        build::fsop::FsOpError,
        dockerfile::{ExpandError, MountError, ParseError, PortSpecError},
        layers::LayerError,
        remote::RemoteError,
        sandbox::{
            cgroup::{CgroupError, LimitHit},
            emulation::EmulationUnavailable,
            SandboxError,
        },
    },
    model::ImageRefError,
    registry::{PlatformParseError, RegistryError},
};

/// Why a build failed.
///
/// Retryable ([`EngineError::is_retryable`]): `Registry` when the registry's error is, and
/// nothing else: every other failure is in the Dockerfile, its context or this host, and
/// running the build again gives the same answer.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A Dockerfile instruction cannot be applied, for a reason the engine found itself (the
    /// message names the line).
    #[error("Dockerfile line {line}: {message}")]
    Instruction { line: usize, message: String },
    /// A Dockerfile instruction failed: `what` names the instruction or flag when the cause
    /// alone would not say it (`FROM`, `RUN --mount`, …).
    #[error("Dockerfile line {line}: {}{source}", what.as_deref().map(|w| format!("{w}: ")).unwrap_or_default())]
    Step {
        line: usize,
        what: Option<String>,
        /// Boxed: a step's cause is large, and `Result<_, EngineError>` is everywhere.
        #[source]
        source: Box<StepCause>,
    },
    /// A RUN step exited non-zero.
    #[error("Dockerfile line {line}: RUN {command} exited with code {exit_code}\n{tail}")]
    RunFailed {
        line: usize,
        command: String,
        exit_code: i32,
        tail: String,
    },
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    /// The data dir's filesystem filled up during the build.
    #[error("{full}")]
    NoSpace {
        full: crate::engine::storage::DiskFull,
        /// What failed for want of space.
        #[source]
        source: Box<EngineError>,
    },
    #[error("layer store: {0}")]
    Layer(#[from] LayerError),
    /// A RUN step hit one of the build's limits (`engine.limits`).
    #[error("Dockerfile line {line}: RUN {command}: {hit}")]
    LimitReached {
        line: usize,
        command: String,
        hit: LimitHit,
    },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("the build's cgroup: {0}")]
    Cgroup(#[source] CgroupError),
    #[error("build cancelled")]
    Cancelled,
}

/// The typed cause of an [`EngineError::Step`].
#[derive(Debug, thiserror::Error)]
pub enum StepCause {
    /// ARG/ENV expansion of a word, a heredoc or a flag.
    #[error(transparent)]
    Expand(#[from] ExpandError),
    /// A `RUN --mount` that does not expand to a valid mount.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// Dockerfile text a step parses itself that does not parse.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// An image reference (`FROM`, `COPY --from`) that does not parse.
    #[error(transparent)]
    Reference(#[from] ImageRefError),
    /// An image (`FROM`, `COPY --from`) the registry could not give: missing, not readable,
    /// or a registry that did not answer (then retryable, see [`EngineError::is_retryable`]).
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// An EXPOSE port specification that is not valid.
    #[error(transparent)]
    PortSpec(#[from] PortSpecError),
    /// COPY/ADD/WORKDIR applied through the filesystem helper.
    #[error(transparent)]
    FileOperation(#[from] FsOpError),
    /// A remote ADD source (`ADD https://…`) that could not be downloaded, or was refused.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The sources of a COPY/ADD, hashed for the instruction cache.
    #[error(transparent)]
    ContextHash(#[from] ContextHashError),
    /// RUN's sandbox could not run the command.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// A `FROM --platform` (after expansion) or a requested platform that is not one.
    #[error(transparent)]
    Platform(#[from] PlatformParseError),
    /// A RUN for a foreign architecture on a host without qemu-user emulation for it.
    #[error(transparent)]
    Emulation(#[from] EmulationUnavailable),
    /// A blocking task the step ran on panicked or was cancelled.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

/// Why the sources of a COPY/ADD could not be hashed. Paths are relative to the context.
#[derive(Debug, thiserror::Error)]
pub enum ContextHashError {
    #[error("{path}: {source}")]
    Resolve {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{source_path}: not found in the build context (or excluded by .dockerignore)")]
    NotFound { source_path: String },
    #[error("{path}: {}", source.kind())]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{source_path}: the files it copies exceed the limit of {limit} bytes")]
    TooLarge { source_path: String, limit: u64 },
}

impl EngineError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    /// An instruction on `line` the engine refuses, with its own message.
    pub(crate) fn at(line: usize, message: impl Into<String>) -> Self {
        Self::Instruction {
            line,
            message: message.into(),
        }
    }

    /// An instruction on `line` that failed for `cause`.
    pub(crate) fn step(line: usize, cause: impl Into<StepCause>) -> Self {
        Self::Step {
            line,
            what: None,
            source: Box::new(cause.into()),
        }
    }

    /// [`EngineError::step`], naming the instruction or flag (`what`) the cause is about.
    pub(crate) fn step_in(line: usize, what: impl Into<String>, cause: impl Into<StepCause>) -> Self {
        Self::Step {
            line,
            what: Some(what.into()),
            source: Box::new(cause.into()),
        }
    }

    /// This error, placed on `line` of the Dockerfile under `what` (`FROM <image>`, …) if it
    /// is a registry error, which alone would not say which instruction wanted the image.
    /// Other errors are returned as they are.
    pub(crate) fn on_line(self, line: usize, what: impl Into<String>) -> Self {
        match self {
            Self::Registry(e) => Self::step_in(line, what, e),
            other => other,
        }
    }

    /// Whether running the build again may succeed: only a registry that was unavailable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Registry(e) => e.is_retryable(),
            Self::Step { source, .. } => matches!(&**source, StepCause::Registry(e) if e.is_retryable()),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn steps_keep_their_cause_and_read_as_before() {
        let cause = ContextHashError::NotFound {
            source_path: "app/".into(),
        };
        let e = EngineError::step_in(7, "COPY", cause);
        assert_eq!(
            e.to_string(),
            "Dockerfile line 7: COPY: app/: not found in the build context (or excluded by .dockerignore)"
        );
        let cause = e.source().expect("a step keeps its cause");
        assert_eq!(
            cause.to_string(),
            "app/: not found in the build context (or excluded by .dockerignore)"
        );
        let e = EngineError::step(
            3,
            ContextHashError::TooLarge {
                source_path: ".".into(),
                limit: 10,
            },
        );
        assert_eq!(
            e.to_string(),
            "Dockerfile line 3: .: the files it copies exceed the limit of 10 bytes"
        );
        assert!(!e.is_retryable());
        assert!(!EngineError::Cancelled.is_retryable());
    }

    #[test]
    fn registry_errors_of_an_instruction_name_its_line_and_stay_retryable_when_they_were() {
        let missing = || RegistryError::PlatformNotFound {
            reference: "reg/nosuch/image:1".into(),
            platform: "linux/amd64".into(),
            available: vec![],
        };
        let e = EngineError::from(missing()).on_line(3, "FROM reg/nosuch/image:1");
        assert!(
            e.to_string()
                .starts_with("Dockerfile line 3: FROM reg/nosuch/image:1: reg/nosuch/image:1"),
            "{e}"
        );
        assert!(
            matches!(&e, EngineError::Step { line: 3, source, .. } if matches!(**source, StepCause::Registry(_)))
        );
        assert!(!e.is_retryable());
        let down = RegistryError::RetriesExhausted {
            registry: "reg".into(),
            attempts: 3,
            last: Box::new(missing()),
        };
        let e = EngineError::from(down).on_line(3, "FROM reg/nosuch/image:1");
        assert!(e.to_string().starts_with("Dockerfile line 3: "), "{e}");
        assert!(
            e.is_retryable(),
            "an unavailable registry is worth a retry, with or without a line"
        );
        // Errors that are not the registry's are left as they are.
        assert!(matches!(
            EngineError::Cancelled.on_line(3, "FROM x"),
            EngineError::Cancelled
        ));
    }
}
