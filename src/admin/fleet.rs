//! Fleet-wide commands: what goes over the control topic (a command, an
//! instance's answer, an instance's heartbeat), signed with a shared
//! secret when one is configured. Reading and writing the topic is the
//! runtime's (`runtime/fleet.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::control::{Command, ControlReport, Outcome, SeekTo};
use crate::config::Secret;

/// Where the fleet's commands travel, and who may send them.
///
/// Whoever can write the control topic can pause, resume and seek every
/// consumer of the fleet: restrict writes to it with Kafka ACLs, and set a
/// [`secret`](Self::secret) that every instance shares, so an unsigned or
/// wrongly signed command is refused (and logged) instead of applied.
#[derive(Clone)]
pub struct FleetSettings {
    pub(crate) topic: String,
    pub(crate) secret: Option<Secret>,
    pub(crate) instance: Option<String>,
    pub(crate) heartbeat: Duration,
    pub(crate) answer_wait: Duration,
}

impl Default for FleetSettings {
    fn default() -> Self {
        FleetSettings {
            topic: "kontext.control".into(),
            secret: None,
            instance: None,
            heartbeat: Duration::from_secs(2),
            answer_wait: Duration::from_secs(30),
        }
    }
}

impl FleetSettings {
    /// The control topic `kontext.control` (one partition, compacted), no
    /// secret.
    pub fn new() -> Self {
        FleetSettings::default()
    }

    /// Another control topic, one per fleet.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }

    /// The secret every instance signs and checks commands with
    /// (HMAC-SHA256). Without one, commands are accepted unsigned: then
    /// only Kafka ACLs on the control topic stand between its writers and
    /// the fleet's consumers.
    pub fn secret(mut self, secret: impl Into<Secret>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// This instance's name in answers (its client id and a random suffix
    /// unless set).
    pub fn instance(mut self, name: impl Into<String>) -> Self {
        self.instance = Some(name.into());
        self
    }

    /// How often an instance says it is alive (kept between 100 ms and a
    /// minute); an issuer waits for the answers of instances heard from
    /// within three of these.
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every.clamp(Duration::from_millis(100), Duration::from_secs(60));
        self
    }

    /// Longest an issuer waits for every live instance's answer.
    pub fn answer_wait(mut self, wait: Duration) -> Self {
        self.answer_wait = wait;
        self
    }
}

impl std::fmt::Debug for FleetSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetSettings")
            .field("topic", &self.topic)
            .field("signed", &self.secret.is_some())
            .field("instance", &self.instance)
            .field("heartbeat", &self.heartbeat)
            .field("answer_wait", &self.answer_wait)
            .finish()
    }
}

/// What every live instance of the fleet answered to one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FleetReport {
    /// The command's id (applied once per instance, however often it is
    /// delivered).
    pub id: String,
    /// Each instance's answers: one per lane of its that reads the topic
    /// (none when it does not consume it).
    pub instances: BTreeMap<String, Vec<ControlReport>>,
    /// Instances heard from lately that did not answer in time.
    pub silent: Vec<String>,
    /// For a seek, by consumer group: the partitions (those named, else
    /// the topic's as the model declares them) no instance moved with its
    /// commit taken: none that answered owned them when the command
    /// arrived (a rebalance under way, or a silent instance's), or the
    /// group refused the commit (`uncommitted`). Seek them again once the
    /// group has settled. Empty for a pause or resume: a pause holds them
    /// for whichever instance gets them.
    pub unapplied: BTreeMap<String, Vec<i32>>,
}

impl FleetReport {
    /// Per group (those that answered, and `group` if given), the
    /// partitions of `all` no answer says it moved and committed.
    pub(crate) fn unmoved(&self, all: &[i32], group: Option<&str>) -> BTreeMap<String, Vec<i32>> {
        let mut moved: BTreeMap<String, std::collections::BTreeSet<i32>> = BTreeMap::new();
        if let Some(g) = group {
            moved.entry(g.to_owned()).or_default();
        }
        for r in self.instances.values().flatten() {
            if group.is_some_and(|g| g != r.group) {
                continue;
            }
            let done = moved.entry(r.group.clone()).or_default();
            if let Outcome::Applied {
                partitions,
                uncommitted: None,
                ..
            } = &r.outcome
            {
                done.extend(partitions);
            }
        }
        moved
            .into_iter()
            .map(|(g, done)| {
                let left: Vec<i32> = all.iter().copied().filter(|p| !done.contains(p)).collect();
                (g, left)
            })
            .filter(|(_, left)| !left.is_empty())
            .collect()
    }
}

/// A command as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FleetCommand {
    pub(crate) id: String,
    pub(crate) issuer: String,
    pub(crate) issued_by: String,
    pub(crate) op: Op,
    pub(crate) topic: String,
    pub(crate) group: Option<String>,
    pub(crate) partitions: Option<Vec<i32>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Op {
    Pause,
    Resume,
    Seek(SeekTo),
}

impl Op {
    pub(crate) fn of(command: &Command) -> Op {
        match command {
            Command::Pause => Op::Pause,
            Command::Resume => Op::Resume,
            Command::Seek(to) => Op::Seek(*to),
        }
    }

    pub(crate) fn command(&self) -> Command {
        match self {
            Op::Pause => Command::Pause,
            Op::Resume => Command::Resume,
            Op::Seek(to) => Command::Seek(*to),
        }
    }
}

/// One record of the control topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum Envelope {
    /// `body` is a [`FleetCommand`] as JSON, `sig` its HMAC in hex.
    Command {
        body: String,
        sig: Option<String>,
    },
    Answer {
        id: String,
        instance: String,
        reports: Vec<ControlReport>,
    },
    Alive {
        instance: String,
    },
}

impl FleetCommand {
    /// The record's key: a pause or resume is the standing state of its
    /// lane (the compacted topic keeps the last one per lane and
    /// partitions); a seek happens once.
    pub(crate) fn key(&self) -> String {
        match self.op {
            Op::Pause | Op::Resume => format!(
                "hold/{}/{}/{}",
                self.group.as_deref().unwrap_or("*"),
                self.topic,
                self.partitions
                    .as_ref()
                    .map_or("*".to_owned(), |p| format!("{p:?}"))
            ),
            Op::Seek(_) => format!("seek/{}", self.id),
        }
    }

    pub(crate) fn seal(&self, secret: Option<&Secret>) -> Result<Envelope, serde_json::Error> {
        let body = serde_json::to_string(self)?;
        let sig = secret.map(|s| sign(s, &body));
        Ok(Envelope::Command { body, sig })
    }

    /// The command in `body`, if its signature holds (or no secret is
    /// set): `Err` says why it is refused.
    pub(crate) fn open(
        body: &str,
        sig: Option<&str>,
        secret: Option<&Secret>,
    ) -> Result<FleetCommand, &'static str> {
        if let Some(secret) = secret {
            let sig = sig.ok_or("unsigned")?;
            let sig = hex::decode(sig).map_err(|_| "malformed signature")?;
            let mut mac = mac(secret);
            mac.update(body.as_bytes());
            // Constant time.
            mac.verify_slice(&sig).map_err(|_| "bad signature")?;
        }
        serde_json::from_str(body).map_err(|_| "malformed command")
    }
}

fn mac(secret: &Secret) -> Hmac<Sha256> {
    // HMAC takes a key of any length.
    match Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    }
}

fn sign(secret: &Secret, body: &str) -> String {
    let mut mac = mac(secret);
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> FleetCommand {
        FleetCommand {
            id: "1".into(),
            issuer: "ops".into(),
            issued_by: "a".into(),
            op: Op::Pause,
            topic: "jobs".into(),
            group: None,
            partitions: None,
        }
    }

    #[test]
    fn a_seeks_unapplied_partitions_are_those_no_instance_moved() {
        let answer = |outcome| ControlReport {
            service: "shared-g".into(),
            group: "g".into(),
            topic: "jobs".into(),
            types: vec!["Job".into()],
            outcome,
        };
        let moved = |partitions: Vec<i32>| Outcome::Applied {
            positions: partitions.iter().map(|p| (*p, 0)).collect(),
            partitions,
            not_applied: Vec::new(),
            held: false,
            uncommitted: None,
        };
        let report = FleetReport {
            id: "1".into(),
            instances: BTreeMap::from([
                ("a".to_owned(), vec![answer(moved(vec![0, 2]))]),
                (
                    "b".to_owned(),
                    vec![answer(Outcome::NotOwned {
                        partitions: Vec::new(),
                    })],
                ),
                ("c".to_owned(), vec![answer(moved(vec![3]))]),
            ]),
            silent: vec!["d".into()],
            unapplied: BTreeMap::new(),
        };
        let left = |g: &str, ps: Vec<i32>| BTreeMap::from([(g.to_owned(), ps)]);
        assert_eq!(report.unmoved(&[0, 1, 2, 3], None), left("g", vec![1]));
        assert_eq!(report.unmoved(&[2, 3], Some("g")), BTreeMap::new());
        // Another group, which no instance answered for: nothing moved there.
        assert_eq!(report.unmoved(&[2, 3], Some("h")), left("h", vec![2, 3]));
    }

    #[test]
    fn a_signed_command_opens_with_its_secret_only() {
        let secret = Secret::from("s");
        let Envelope::Command { body, sig } = command().seal(Some(&secret)).unwrap() else {
            panic!("a command");
        };
        assert_eq!(
            FleetCommand::open(&body, sig.as_deref(), Some(&secret)),
            Ok(command())
        );
        let other = Secret::from("t");
        assert_eq!(
            FleetCommand::open(&body, sig.as_deref(), Some(&other)),
            Err("bad signature")
        );
        assert_eq!(
            FleetCommand::open(&body, None, Some(&secret)),
            Err("unsigned")
        );
        let forged = body.replace("jobs", "bills");
        assert_eq!(
            FleetCommand::open(&forged, sig.as_deref(), Some(&secret)),
            Err("bad signature")
        );
        assert_eq!(
            FleetCommand::open("{", None, None),
            Err("malformed command")
        );
    }

    #[test]
    fn holds_are_keyed_by_lane_and_seeks_by_id() {
        let mut c = command();
        assert_eq!(c.key(), "hold/*/jobs/*");
        c.partitions = Some(vec![1, 2]);
        assert_eq!(c.key(), "hold/*/jobs/[1, 2]");
        c.op = Op::Seek(SeekTo::End);
        assert_eq!(c.key(), "seek/1");
    }
}
