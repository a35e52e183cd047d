//! Operator commands from `Kontext` (or the fleet's control topic) to the
//! poll services reading a lane: each service's poll thread applies its
//! share (`poll/control.rs`) and answers on a one-shot channel.

use std::sync::Arc;
use std::time::Duration;

use super::ConsumerRuntime;
use super::poll::{Request, ServiceShared};
use crate::admin::{Command, ControlReport, Outcome};

/// How long a command waits for a poll thread's answer. A seek may wait
/// for a running handler (the revoke timeout) and the broker; a service
/// waiting to be started answers when it starts.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// A pause (or resume) standing in the fleet when this process starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Standing {
    pub(crate) topic: String,
    pub(crate) group: Option<String>,
    pub(crate) partitions: Option<Vec<i32>>,
    pub(crate) command: Command,
}

/// Queues the standing commands that concern `shared`, in their order,
/// before its poll thread runs: it applies them before its first poll.
pub(crate) fn queue_standing(shared: &ServiceShared, standing: &[Standing]) {
    for s in standing {
        if !reads(shared, &s.topic, s.group.as_deref(), None) {
            continue;
        }
        // Nobody waits for these answers.
        let (reply, _) = tokio::sync::oneshot::channel();
        let _ = shared.control.send(Request {
            topic: s.topic.clone(),
            partitions: s.partitions.clone(),
            command: s.command.clone(),
            reply,
        });
    }
}

fn reads(shared: &ServiceShared, topic: &str, group: Option<&str>, service: Option<&str>) -> bool {
    shared
        .topics
        .get()
        .is_some_and(|t| t.iter().any(|t| t == topic))
        && group.is_none_or(|g| g == shared.group_id)
        && service.is_none_or(|n| n == shared.name)
}

/// What sends commands to this process's poll services. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Controller {
    services: Vec<Arc<ServiceShared>>,
}

impl ConsumerRuntime {
    pub(crate) fn controller(&self) -> Controller {
        Controller {
            services: self
                .services
                .iter()
                .map(|s| Arc::clone(&s.shared))
                .collect(),
        }
    }
}

impl Controller {
    /// Sends `command` to every poll service reading `topic` (of `group`,
    /// or only service `service`), and gathers their answers. Empty when
    /// none reads it.
    pub(crate) async fn control(
        &self,
        topic: &str,
        group: Option<&str>,
        service: Option<&str>,
        partitions: Option<&[i32]>,
        command: Command,
    ) -> Vec<ControlReport> {
        let mut waiting = Vec::new();
        for shared in &self.services {
            if !reads(shared, topic, group, service) {
                continue;
            }
            let (reply, answer) = tokio::sync::oneshot::channel();
            let request = Request {
                topic: topic.to_owned(),
                partitions: partitions.map(<[i32]>::to_vec),
                command: command.clone(),
                reply,
            };
            let sent = shared.control.send(request).is_ok();
            waiting.push((shared, sent, answer));
        }
        let mut reports = Vec::with_capacity(waiting.len());
        for (shared, sent, answer) in waiting {
            let outcome = if !sent {
                Some(Outcome::Refused {
                    reason: "the poll service has stopped".into(),
                })
            } else {
                match tokio::time::timeout(ANSWER_WAIT, answer).await {
                    Ok(Ok(report)) => {
                        reports.push(report);
                        None
                    }
                    // The poll thread ended with the command unread.
                    Ok(Err(_)) => Some(Outcome::Refused {
                        reason: "the poll service has stopped".into(),
                    }),
                    Err(_) => Some(Outcome::Queued),
                }
            };
            if let Some(outcome) = outcome {
                reports.push(ControlReport {
                    service: shared.name.clone(),
                    group: shared.group_id.clone(),
                    topic: topic.to_owned(),
                    types: Vec::new(),
                    outcome,
                });
            }
        }
        reports
    }
}
