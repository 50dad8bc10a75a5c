//! The kinds of supervised actor, by the names `ListActors`, chaos mode and the metrics use.
//! The actors themselves live in `crate::actors`; this is only their vocabulary, so that the
//! config, the metrics and the gRPC edge can name a kind without depending on the actors.

use std::{fmt, str::FromStr};

/// What kind of actor a supervised child is (the `kind` of `ListActors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActorKind {
    Supervisor,
    Orchestrator,
    Build,
    Resolver,
    CacheWarmer,
    LogFanout,
}

impl ActorKind {
    pub const ALL: [ActorKind; 6] = [
        Self::Supervisor,
        Self::Orchestrator,
        Self::Build,
        Self::Resolver,
        Self::CacheWarmer,
        Self::LogFanout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Supervisor => "supervisor",
            Self::Orchestrator => "orchestrator",
            Self::Build => "build",
            Self::Resolver => "resolver",
            Self::CacheWarmer => "cache_warmer",
            Self::LogFanout => "log_fanout",
        }
    }
}

impl fmt::Display for ActorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not an [`ActorKind`]. Not retryable: the caller must fix the name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown actor kind {0:?}; kinds are supervisor, orchestrator, build, resolver, cache_warmer, log_fanout"
)]
pub struct UnknownActorKind(pub String);

impl FromStr for ActorKind {
    type Err = UnknownActorKind;

    /// A kind by its name as `ListActors` shows it (surrounding white space ignored).
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == name.trim())
            .ok_or_else(|| UnknownActorKind(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_back_from_their_names() {
        for kind in ActorKind::ALL {
            assert_eq!(kind.as_str().parse::<ActorKind>(), Ok(kind));
        }
        assert_eq!(" build ".parse::<ActorKind>(), Ok(ActorKind::Build));
        let err = "builder".parse::<ActorKind>().unwrap_err();
        assert!(
            err.to_string().starts_with("unknown actor kind \"builder\""),
            "{err}"
        );
    }
}
