//! Operator commands from `Kontext` to the poll services reading a lane:
//! each service's poll thread applies its share (`poll/control.rs`) and
//! answers on a one-shot channel.

use std::time::Duration;

use super::ConsumerRuntime;
use super::poll::Request;
use crate::admin::{Command, ControlReport, Outcome};

/// How long a command waits for a poll thread's answer. A seek may wait
/// for a running handler (the revoke timeout) and the broker; a service
/// waiting to be started answers when it starts.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

impl ConsumerRuntime {
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
        for s in &self.services {
            let shared = &s.shared;
            let reads = shared
                .topics
                .get()
                .is_some_and(|t| t.iter().any(|t| t == topic));
            if !reads
                || group.is_some_and(|g| g != shared.group_id)
                || service.is_some_and(|n| n != shared.name)
            {
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
