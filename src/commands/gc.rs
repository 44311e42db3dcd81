//! `ec2-backup gc`: finds what killed runs (kill -9, power loss) left behind and removes it.
//!
//! Only resources the tool tagged are considered: helper instances, temporary security groups,
//! volumes a run created whose backup never completed, and snapshots a run started but never
//! kept (it died while waiting for them). A completed backup, a user's own
//! volume (named with -v), and anything untagged are never touched. A run counts as abandoned
//! when it was started on this host and its process is gone, or when it is older than
//! `--older-than` (a run on another host cannot be checked otherwise).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::cloud::aws;
use crate::cloud::snapshot::Snapshots;
use crate::cloud::{wait, Cloud, ResourceKind, Tagged};
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
    let cloud = aws::connect().await.map_err(crate::helper::plan::input)?;
    let (instances, volumes, groups, shared, snapshots) = tokio::try_join!(
        cloud.tagged(ResourceKind::Instance, RUN_TAG),
        cloud.tagged(ResourceKind::Volume, RUN_TAG),
        cloud.tagged(ResourceKind::SecurityGroup, RUN_TAG),
        cloud.tagged(ResourceKind::SecurityGroup, crate::tags::key::SHARED_GROUP),
        cloud.snapshots_tagged(RUN_TAG),
    )?;
    let now = chrono::Utc::now();
    let here = hostname();
    let verdict =
        |t: &BTreeMap<String, String>| abandoned(t, &here, now, options.older_than, pid_alive);
    let report = Reporter::new(options.verbose);
    let mut lines = Vec::new();
    let verb = |doing: &str, done: &str| {
        if options.yes {
            done.to_string()
        } else {
            format!("would {doing}")
        }
    };
    let alive = |state: &str| matches!(state, "pending" | "running" | "stopping" | "stopped");
    let mut doomed_instances = Vec::new();
    for i in instances.iter().filter(|i| alive(&i.state)) {
        if !launched_by_its_run(i) {
            report.step(&format!(
                "{} carries ec2-backup's tags but was not launched by that run; left alone",
                i.id
            ));
            continue;
        }
        if let Some(why) = verdict(&i.tags) {
            lines.push(format!(
                "{} helper instance {} ({why})",
                verb("terminate", "terminating"),
                i.id
            ));
            doomed_instances.push(i.id.clone());
        }
    }
    let gone = |state: &str| matches!(state, "deleting" | "deleted");
    let mut doomed_volumes = Vec::new();
    for v in volumes
        .iter()
        .filter(|v| unfinished_volume(&v.tags) && !gone(&v.state))
    {
        if let Some(why) = verdict(&v.tags) {
            lines.push(format!(
                "{} incomplete volume {} ({why})",
                verb("delete", "deleting"),
                v.id
            ));
            doomed_volumes.push(v.id.clone());
        }
    }
    let mut doomed_groups = Vec::new();
    for g in &groups {
        if let Some(why) = verdict(&g.tags) {
            lines.push(format!(
                "{} security group {} ({why})",
                verb("delete", "deleting"),
                g.id
            ));
            doomed_groups.push(g.id.clone());
        }
    }
    let mut doomed_snapshots = Vec::new();
    for n in snapshots.iter().filter(|n| unkept_snapshot(&n.tags)) {
        if let Some(why) = verdict(&n.tags) {
            lines.push(format!(
                "{} unkept snapshot {} ({}; {why})",
                verb("delete", "deleting"),
                n.id,
                n.state
            ));
            doomed_snapshots.push(n.id.clone());
        }
    }
    // The helpers' shared group is kept between runs; gc removes it once no helper uses it
    // (the next run makes it again).
    for g in &shared {
        lines.push(format!(
            "{} security group {} (the helpers' shared group, unless a helper uses it then)",
            verb("delete", "deleting"),
            g.id
        ));
    }
    if !options.yes {
        return Ok(GcReport {
            lines,
            leftovers: Vec::new(),
        });
    }
    // Helpers first: volumes and groups are free only once they are gone.
    let ledger = Ledger::default();
    for id in &doomed_instances {
        ledger.record(Resource::Instance(id.clone()));
    }
    let mut leftovers = ledger.unwind(&cloud, None, &report).await;
    for id in &doomed_instances {
        if let Err(e) = wait::instance_terminated(&cloud, id, Duration::from_secs(300)).await {
            report.step(&e.to_string());
        }
    }
    // Minutes may have passed: a volume is deleted only if, read again now, it is still an
    // unfinished volume of an abandoned run (a run judged by age may have finished meanwhile).
    for id in &doomed_volumes {
        let again = match cloud.describe_volume(id).await {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) => {
                leftovers.push(format!("the volume {id} could not be checked again ({e})"));
                continue;
            }
        };
        if !unfinished_volume(&again.tags) || verdict(&again.tags).is_none() {
            lines.push(format!(
                "kept the volume {id}: its run finished it meanwhile"
            ));
            continue;
        }
        let ledger = Ledger::default();
        ledger.record(Resource::Volume(id.clone()));
        leftovers.extend(ledger.unwind(&cloud, None, &report).await);
    }
    // Read again too: a run judged by age may have kept it meanwhile. A pending snapshot is
    // deleted as well (EC2 removes it once it completes).
    for id in &doomed_snapshots {
        match cloud.describe_snapshot(id).await {
            Ok(Some(n)) if unkept_snapshot(&n.tags) && verdict(&n.tags).is_some() => {
                if let Err(e) = crate::history::snapshot::discard(&cloud, id).await {
                    leftovers.push(format!("the snapshot {id} could not be deleted ({e})"));
                }
            }
            Ok(Some(_)) => lines.push(format!("kept the snapshot {id}: its run kept it meanwhile")),
            Ok(None) => {}
            Err(e) => leftovers.push(format!(
                "the snapshot {id} could not be checked again ({e})"
            )),
        }
    }
    for id in &doomed_groups {
        if let Err(e) = crate::ledger::delete_group(&cloud, id).await {
            leftovers.push(format!(
                "the security group {id} could not be deleted ({e})"
            ));
        }
    }
    // One try each: a shared group a helper still uses is kept (the next gc takes it).
    for g in &shared {
        match cloud.delete_security_group(&g.id).await {
            Ok(()) => {}
            Err(e) if e.code.as_deref() == Some("DependencyViolation") => {
                lines.push(format!("kept security group {}: a helper uses it", g.id));
            }
            Err(e) => leftovers.push(format!(
                "the security group {} could not be deleted ({e})",
                g.id
            )),
        }
    }
    Ok(GcReport { lines, leftovers })
}

/// Whether an instance carrying a run's tags is that run's helper: launched within minutes of
/// the run's start. "Launch more like this" copies an instance's tags to a new one, which
/// gc must never terminate.
fn launched_by_its_run(i: &Tagged) -> bool {
    let parse = |t: &str| chrono::DateTime::parse_from_rfc3339(t).ok();
    let created = i.tags.get(crate::tags::key::CREATED).and_then(|c| parse(c));
    let launched = i.launched.as_deref().and_then(parse);
    match (created, launched) {
        (Some(c), Some(l)) => {
            let after = l.signed_duration_since(c);
            after >= chrono::Duration::minutes(-5) && after <= chrono::Duration::minutes(30)
        }
        _ => false,
    }
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

/// A snapshot a run started and never saw completed (kept ones are backups: never collected),
/// and whose deletion nobody asked for yet.
pub fn unkept_snapshot(tags: &BTreeMap<String, String>) -> bool {
    let is = |k: &str| tags.get(k).is_some_and(|v| v == "true");
    !is(crate::tags::key::KEPT) && !is(crate::tags::key::DELETING)
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
    let process = tags.get(crate::tags::key::PROCESS);
    if let Some(alive) = process.and_then(|p| crate::tags::process_alive(p)) {
        return (!alive).then(|| format!("run {run}: its process on this host is gone"));
    }
    if host == here && process.is_none() {
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
    fn only_snapshots_nobody_kept_or_deleted_are_collectable() {
        assert!(unkept_snapshot(&tags(&[("ec2-backup:run", "r")])));
        assert!(!unkept_snapshot(&tags(&[("ec2-backup:kept", "true")])));
        assert!(!unkept_snapshot(&tags(&[("ec2-backup:deleting", "true")])));
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
        // A process identity from another machine is judged by age too; one from this
        // machine by its process, whatever host name it carries.
        let mut elsewhere = t(&fresh);
        elsewhere.insert(crate::tags::key::PROCESS.into(), "m:b:1:2".into());
        assert!(abandoned(&elsewhere, "other", now, day, |_| true).is_none());
        let mut mine = t(&fresh);
        mine.insert(
            crate::tags::key::PROCESS.into(),
            crate::tags::process_identity(),
        );
        assert!(abandoned(&mine, "me", now, day, |_| false).is_none());
        // Without a creation time nothing can be proven: leave it.
        assert!(abandoned(&tags(&[(RUN_TAG, "r")]), "me", now, day, |_| false).is_none());
    }
}

#[cfg(test)]
mod copy_tests {
    use super::*;

    fn helper(created: &str, launched: Option<&str>) -> Tagged {
        Tagged {
            id: "i-1".into(),
            state: "running".into(),
            tags: [(crate::tags::key::CREATED.to_string(), created.to_string())].into(),
            launched: launched.map(str::to_string),
            size_gib: None,
        }
    }

    #[test]
    fn an_instance_launched_long_after_its_run_is_a_copy() {
        let t = "2026-12-01T10:00:00Z";
        assert!(launched_by_its_run(&helper(
            t,
            Some("2026-12-01T10:00:20+00:00")
        )));
        assert!(!launched_by_its_run(&helper(
            t,
            Some("2026-12-03T09:00:00+00:00")
        )));
        assert!(!launched_by_its_run(&helper(t, None)));
    }
}
