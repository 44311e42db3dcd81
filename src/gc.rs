//! `ec2-backup gc`: finds what killed runs (kill -9, power loss) left behind and removes it.
//!
//! Only resources the tool tagged are considered: helper instances, temporary security groups,
//! and volumes a run created whose backup never completed. A completed backup, a user's own
//! volume (named with -v), and anything untagged are never touched. A run counts as abandoned
//! when it was started on this host and its process is gone, or when it is older than
//! `--older-than` (a run on another host cannot be checked otherwise).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::cloud::aws;
use crate::cloud::{Cloud, ResourceKind, Tagged};
use crate::error::Error;
use crate::ledger::{Ledger, Resource};
use crate::report::Reporter;
use crate::tags::hostname;

use crate::tags::key::{
    CREATED_VOLUME as CREATED_VOLUME_TAG, FINISHED as FINISHED_TAG, RUN as RUN_TAG,
};

pub struct GcOptions {
    pub yes: bool,
    pub older_than: Duration,
    pub verbose: bool,
}

/// What gc found (and, with `--yes`, removed).
pub struct GcReport {
    pub lines: Vec<String>,
    pub leftovers: Vec<String>,
}

pub async fn gc(options: &GcOptions) -> Result<GcReport, Error> {
    let cloud = aws::connect().await.map_err(crate::prepare::input)?;
    let (instances, volumes, groups) = tokio::try_join!(
        cloud.tagged(ResourceKind::Instance, RUN_TAG),
        cloud.tagged(ResourceKind::Volume, RUN_TAG),
        cloud.tagged(ResourceKind::SecurityGroup, RUN_TAG),
    )?;
    let now = chrono::Utc::now();
    let here = hostname();
    let verdict = |t: &Tagged| abandoned(&t.tags, &here, now, options.older_than, pid_alive);

    let ledger = Ledger::default();
    let mut lines = Vec::new();
    let verb = |doing: &str, done: &str| {
        if options.yes {
            done.to_string()
        } else {
            format!("would {doing}")
        }
    };
    let mut found = |t: &Tagged, noun: &str, (doing, done): (&str, &str), r: Resource| {
        if let Some(why) = verdict(t) {
            lines.push(format!("{} {noun} {} ({why})", verb(doing, done), t.id));
            ledger.record(r);
        }
    };
    let delete = ("delete", "deleting");
    for g in &groups {
        found(
            g,
            "security group",
            delete,
            Resource::SecurityGroup(g.id.clone()),
        );
    }
    let gone = |state: &str| matches!(state, "deleting" | "deleted");
    for v in volumes
        .iter()
        .filter(|v| unfinished_volume(&v.tags) && !gone(&v.state))
    {
        found(
            v,
            "incomplete volume",
            delete,
            Resource::Volume(v.id.clone()),
        );
    }
    let alive = |state: &str| matches!(state, "pending" | "running" | "stopping" | "stopped");
    for i in instances.iter().filter(|i| alive(&i.state)) {
        let terminate = ("terminate", "terminating");
        found(
            i,
            "helper instance",
            terminate,
            Resource::Instance(i.id.clone()),
        );
    }
    let leftovers = if options.yes {
        ledger
            .unwind(&cloud, None, &Reporter::new(options.verbose))
            .await
    } else {
        Vec::new()
    };
    Ok(GcReport { lines, leftovers })
}

/// A volume a run created and never finished. A finished one is a backup, even an
/// incomplete one (some files unreadable), whose ID the user was given: never collected.
pub fn unfinished_volume(tags: &BTreeMap<String, String>) -> bool {
    tags.get(CREATED_VOLUME_TAG).is_some_and(|x| x == "true")
        && !tags.contains_key(FINISHED_TAG)
        && tags
            .get(crate::tags::key::COMPLETED)
            .is_none_or(|x| x != "true")
}

/// Why a run's resource counts as abandoned, or None while its run may still be going.
pub fn abandoned(
    tags: &BTreeMap<String, String>,
    here: &str,
    now: chrono::DateTime<chrono::Utc>,
    older_than: Duration,
    alive: impl Fn(u32) -> bool,
) -> Option<String> {
    let run = tags.get(RUN_TAG).map(String::as_str).unwrap_or("?");
    let host = tags
        .get(crate::tags::key::HOST)
        .map(String::as_str)
        .unwrap_or("");
    let pid = tags
        .get(crate::tags::key::PID)
        .and_then(|p| p.parse::<u32>().ok());
    if host == here {
        if let Some(pid) = pid {
            return (!alive(pid))
                .then(|| format!("run {run}: its process {pid} on this host is gone"));
        }
    }
    let created = tags
        .get(crate::tags::key::CREATED)
        .and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok())?;
    let age = now.signed_duration_since(created).to_std().ok()?;
    (age > older_than).then(|| {
        format!(
            "run {run} started on {} {} hours ago",
            if host.is_empty() {
                "an unknown host"
            } else {
                host
            },
            age.as_secs() / 3600
        )
    })
}

/// Whether `pid` is a live ec2-backup process.
fn pid_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("ec2-backup"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn runs_on_this_host_are_judged_by_their_process() {
        let now = chrono::Utc::now();
        let t = tags(&[
            (RUN_TAG, "r1"),
            (crate::tags::key::HOST, "me"),
            (crate::tags::key::PID, "42"),
            (
                crate::tags::key::CREATED,
                &now.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            ),
        ]);
        let day = Duration::from_secs(86400);
        assert!(abandoned(&t, "me", now, day, |_| true).is_none());
        let why = abandoned(&t, "me", now, day, |_| false).unwrap();
        assert!(why.contains("process 42"), "{why}");
    }

    #[test]
    fn only_unfinished_volumes_the_tool_made_are_collectable() {
        let made = (CREATED_VOLUME_TAG, "true");
        assert!(unfinished_volume(&tags(&[
            made,
            (crate::tags::key::COMPLETED, "false")
        ])));
        assert!(!unfinished_volume(&tags(&[
            made,
            (crate::tags::key::COMPLETED, "true")
        ])));
        assert!(!unfinished_volume(&tags(&[
            made,
            (FINISHED_TAG, "2026-01-01T00:00:00Z")
        ])));
        // A user's volume (-v) never carries the created-volume tag.
        assert!(!unfinished_volume(&tags(&[(
            crate::tags::key::COMPLETED,
            "false"
        )])));
    }

    #[test]
    fn runs_elsewhere_are_judged_by_age() {
        let now = chrono::Utc::now();
        let old = (now - chrono::Duration::hours(30))
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let fresh = (now - chrono::Duration::hours(1))
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let day = Duration::from_secs(86400);
        let t = |c: &str| {
            tags(&[
                (RUN_TAG, "r"),
                (crate::tags::key::HOST, "other"),
                (crate::tags::key::PID, "1"),
                (crate::tags::key::CREATED, c),
            ])
        };
        assert!(abandoned(&t(&fresh), "me", now, day, |_| false).is_none());
        let why = abandoned(&t(&old), "me", now, day, |_| true).unwrap();
        assert!(why.contains("30 hours"), "{why}");
        // Without a creation time nothing can be proven: leave it.
        assert!(abandoned(&tags(&[(RUN_TAG, "r")]), "me", now, day, |_| false).is_none());
    }
}
