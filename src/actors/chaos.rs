//! Chaos mode: crashing random actors on purpose, to prove that nothing is lost when they
//! crash.
//!
//! The [`ChaosDriver`] is a small actor beside the supervisor (not supervised itself: it
//! never panics). While chaos is on, every `interval` it asks the supervisor to crash one
//! random live actor of the configured kinds ([`super::supervisor::InjectCrash`]); the
//! supervisor sends that actor the same [`super::supervision::Crash`] that
//! `Admin.RestartActor` sends, so the real crash path (panic, `ChildGuard`, restart with
//! backoff) is exercised. The driver counts the crashes it injected.
//!
//! Which actor: first a kind, uniformly among the wanted kinds that have a live actor, then
//! an actor of that kind, uniformly. Picking the kind first keeps every kind under fire even
//! when one kind has many actors (fifty running builds would otherwise draw almost every
//! crash). An actor whose next crash would exhaust its restart budget
//! (`supervision.max_restarts` within `supervision.window`) is spared: chaos exercises
//! recovery, not abandonment.
//!
//! Chaos is configured in `[chaos]` (off by default) and switched at run time with
//! `Admin.SetChaos` / `kiln admin chaos`.

use std::time::Duration;

use actix::prelude::*;
use rand::Rng;

use super::{
    error::BuildError,
    supervision::{ActorKind, Unavailable},
    supervisor::{InjectCrash, Supervisor},
    Directory,
};
use crate::config::ChaosConfig;

/// Why chaos settings cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChaosError {
    #[error(
        "unknown actor kind {0:?}; kinds are supervisor, orchestrator, build, resolver, cache_warmer, log_fanout"
    )]
    UnknownKind(String),
}

/// Parses actor kind names as `ListActors` shows them. An empty list means every kind.
pub fn parse_kinds(names: &[String]) -> Result<Vec<ActorKind>, ChaosError> {
    if names.is_empty() {
        return Ok(ActorKind::ALL.to_vec());
    }
    let mut kinds = Vec::with_capacity(names.len());
    for name in names {
        let kind = ActorKind::ALL
            .into_iter()
            .find(|k| k.as_str() == name.trim())
            .ok_or_else(|| ChaosError::UnknownKind(name.clone()))?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    Ok(kinds)
}

/// What chaos mode should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChaosSettings {
    pub enabled: bool,
    /// The kinds that may be crashed; empty means every kind.
    pub kinds: Vec<ActorKind>,
    /// Time between two crashes; `None` keeps the configured `chaos.interval`.
    pub interval: Option<Duration>,
}

impl ChaosSettings {
    /// The settings of the `[chaos]` table (validated by `Config::validate`).
    pub fn from_config(config: &ChaosConfig) -> Result<Self, ChaosError> {
        Ok(Self {
            enabled: config.enabled,
            kinds: parse_kinds(&config.kinds)?,
            interval: Some(config.interval),
        })
    }
}

/// One actor the chaos may crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub kind: ActorKind,
}

/// Picks the next victim among `candidates`: a kind uniformly among `kinds` that have a
/// candidate, then a candidate of that kind uniformly. `None` when no candidate qualifies.
pub fn pick<'a, R: Rng + ?Sized>(
    candidates: &[Candidate<'a>],
    kinds: &[ActorKind],
    rng: &mut R,
) -> Option<&'a str> {
    let live: Vec<ActorKind> = kinds
        .iter()
        .copied()
        .filter(|k| candidates.iter().any(|c| c.kind == *k))
        .collect();
    if live.is_empty() {
        return None;
    }
    let kind = live[rng.random_range(0..live.len())];
    let of_kind: Vec<&Candidate<'a>> = candidates.iter().filter(|c| c.kind == kind).collect();
    Some(of_kind[rng.random_range(0..of_kind.len())].name)
}

/// Turns chaos on or off; replies the crashes injected so far.
#[derive(Debug, Clone, Message)]
#[rtype(result = "u64")]
pub struct SetChaos(pub ChaosSettings);

/// The chaos driver actor.
pub struct ChaosDriver {
    supervisor: Addr<Supervisor>,
    /// `chaos.interval`, used when a `SetChaos` names none.
    default_interval: Duration,
    kinds: Vec<ActorKind>,
    timer: Option<SpawnHandle>,
    /// An injection is waiting for the supervisor's answer (it may be restarting).
    in_flight: bool,
    injected: u64,
}

impl ChaosDriver {
    /// A driver that applies `initial` when it starts.
    pub fn start(
        supervisor: Addr<Supervisor>,
        initial: ChaosSettings,
        arbiter: &ArbiterHandle,
    ) -> Addr<Self> {
        let default_interval = initial.interval.unwrap_or(Duration::from_millis(100));
        Self::start_in_arbiter(arbiter, move |ctx| {
            let mut driver = Self {
                supervisor,
                default_interval,
                kinds: Vec::new(),
                timer: None,
                in_flight: false,
                injected: 0,
            };
            driver.apply(initial, ctx);
            driver
        })
    }

    fn apply(&mut self, settings: ChaosSettings, ctx: &mut Context<Self>) {
        if let Some(timer) = self.timer.take() {
            ctx.cancel_future(timer);
        }
        self.kinds = if settings.kinds.is_empty() {
            ActorKind::ALL.to_vec()
        } else {
            settings.kinds
        };
        if !settings.enabled {
            if self.injected > 0 {
                tracing::info!(injected = self.injected, "chaos mode off");
            }
            return;
        }
        let interval = settings
            .interval
            .filter(|i| !i.is_zero())
            .unwrap_or(self.default_interval);
        let kinds: Vec<&str> = self.kinds.iter().map(|k| k.as_str()).collect();
        tracing::warn!(
            kinds = %kinds.join(","),
            interval_ms = interval.as_millis() as u64,
            "chaos mode on: crashing a random actor every interval"
        );
        self.timer = Some(ctx.run_interval(interval, |act, ctx| act.tick(ctx)));
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight {
            return; // the supervisor has not answered the last one (it is restarting)
        }
        self.in_flight = true;
        let send = self.supervisor.send(InjectCrash {
            kinds: self.kinds.clone(),
        });
        ctx.spawn(actix::fut::wrap_future(send).map(|reply, act: &mut Self, _| {
            act.in_flight = false;
            if let Ok(Some(victim)) = reply {
                act.injected += 1;
                tracing::debug!(actor = %victim, injected = act.injected, "chaos: crashed an actor");
            }
        }));
    }
}

impl Actor for ChaosDriver {
    type Context = Context<Self>;
}

impl Handler<SetChaos> for ChaosDriver {
    type Result = u64;

    fn handle(&mut self, SetChaos(settings): SetChaos, ctx: &mut Self::Context) -> u64 {
        self.apply(settings, ctx);
        self.injected
    }
}

/// Sends `settings` to the driver of `directory`; replies the crashes injected so far.
pub(super) async fn set(directory: &Directory, settings: ChaosSettings) -> Result<u64, BuildError> {
    directory.chaos.send(SetChaos(settings)).await.map_err(|_| {
        BuildError::from(Unavailable {
            actor: "chaos".into(),
        })
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::{rngs::StdRng, SeedableRng};

    use super::*;

    #[test]
    fn kinds_parse_by_their_listed_names() {
        assert_eq!(parse_kinds(&[]).unwrap(), ActorKind::ALL.to_vec());
        assert_eq!(
            parse_kinds(&["build".into(), "log_fanout".into(), "build".into()]).unwrap(),
            [ActorKind::Build, ActorKind::LogFanout]
        );
        assert_eq!(
            parse_kinds(&["builder".into()]).unwrap_err(),
            ChaosError::UnknownKind("builder".into())
        );
    }

    #[test]
    fn every_wanted_kind_is_hit_however_many_actors_it_has() {
        let builds: Vec<String> = (0..50).map(|i| format!("build-{i}")).collect();
        let mut candidates = vec![
            Candidate {
                name: "orchestrator",
                kind: ActorKind::Orchestrator,
            },
            Candidate {
                name: "log_fanout",
                kind: ActorKind::LogFanout,
            },
        ];
        candidates.extend(builds.iter().map(|n| Candidate {
            name: n,
            kind: ActorKind::Build,
        }));
        let kinds = [ActorKind::Orchestrator, ActorKind::Build, ActorKind::Resolver];
        let mut rng = StdRng::seed_from_u64(7);
        let mut hits = BTreeMap::<&str, usize>::new();
        for _ in 0..3000 {
            let victim = pick(&candidates, &kinds, &mut rng).expect("a victim");
            *hits.entry(victim).or_default() += 1;
        }
        // Never a kind that was not asked for, nor one without a live actor.
        assert!(!hits.contains_key("log_fanout"), "{hits:?}");
        // Half the crashes go to the orchestrator (two live kinds), half spread over builds.
        let orchestrator = hits["orchestrator"];
        assert!((1300..1700).contains(&orchestrator), "{hits:?}");
        let distinct_builds = hits.keys().filter(|n| n.starts_with("build-")).count();
        assert_eq!(distinct_builds, 50, "{hits:?}");
    }

    #[test]
    fn nothing_to_crash_is_none() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(pick(&[], &ActorKind::ALL, &mut rng), None);
        let only = [Candidate {
            name: "resolver-0",
            kind: ActorKind::Resolver,
        }];
        assert_eq!(pick(&only, &[ActorKind::Build], &mut rng), None);
        assert_eq!(pick(&only, &[ActorKind::Resolver], &mut rng), Some("resolver-0"));
    }
}
