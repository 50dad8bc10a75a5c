//! The one place where errors become gRPC statuses. Never `Unknown`.

use tonic::{Code, Status};

use crate::{
    actors::{BuildError, LogError, RestartError},
    registry::RegistryErrorKind,
};

/// The gRPC status for an actor-layer error.
pub fn from_build_error(error: BuildError) -> Status {
    let code = match &error {
        BuildError::Registry(e) | BuildError::Resolve(e) | BuildError::ResolveAt { source: e, .. } => {
            match e.kind() {
                RegistryErrorKind::NotFound => Code::NotFound,
                RegistryErrorKind::Unauthenticated => Code::Unauthenticated,
                RegistryErrorKind::Unavailable => Code::Unavailable,
                RegistryErrorKind::InvalidInput => Code::InvalidArgument,
                RegistryErrorKind::Internal => Code::Internal,
            }
        }
        BuildError::InvalidInput(_) | BuildError::BadSource(_) => Code::InvalidArgument,
        BuildError::NotFound(_) | BuildError::Log(LogError::NotFound(_)) => Code::NotFound,
        BuildError::Unsupported(_) => Code::Unimplemented,
        BuildError::Unavailable(_) | BuildError::SourceUnavailable { .. } | BuildError::ShuttingDown => {
            Code::Unavailable
        }
        BuildError::AlreadyFinished(_) => Code::FailedPrecondition,
        BuildError::Log(_) | BuildError::Internal { .. } => Code::Internal,
    };
    Status::new(code, error.to_string())
}

/// The gRPC status for a failed `RestartActor`.
pub fn from_restart_error(error: RestartError) -> Status {
    let code = match error {
        RestartError::NotFound(_) => Code::NotFound,
        RestartError::NotRestarted(_) => Code::Unavailable,
    };
    Status::new(code, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::Unavailable;

    #[test]
    fn codes() {
        assert_eq!(
            from_build_error(BuildError::InvalidInput("x".into())).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            from_build_error(BuildError::NotFound("x".into())).code(),
            Code::NotFound
        );
        assert_eq!(
            from_build_error(BuildError::Unsupported("x".into())).code(),
            Code::Unimplemented
        );
        let e = BuildError::Unavailable(Unavailable {
            actor: "resolver-0".into(),
        });
        assert_eq!(from_build_error(e).code(), Code::Unavailable);
        assert_eq!(
            from_restart_error(RestartError::NotFound("x".into())).code(),
            Code::NotFound
        );
    }
}
