//! `ec2-backup prune --keep-… [--yes]`: deletes old backups by restic's forget policy
//! ([`crate::history::policy`]). Considered are only what this tool made and finished: the
//! snapshots a run kept (`ec2-backup:kept`) and the volumes a run created
//! (`ec2-backup:created-volume`) and finished, never one named with -v. Groups: source host,
//! the directory's path hash (the path tag may be cut), method, and kind (a volume and the
//! snapshot of one run are two copies of one backup, counted apart). Each doomed backup is
//! read again right before it is deleted.

use std::collections::BTreeMap;

use crate::cloud::aws::{self, AwsCloud};
use crate::cloud::snapshot::Snapshots;
use crate::cloud::{Cloud, ResourceKind};
use crate::error::Error;
use crate::helper::plan::input;
use crate::history::policy::{self, Decision, Item, Policy};
use crate::report::Reporter;
use crate::tags::key;

pub struct PruneOptions {
    pub policy: Policy,
    pub yes: bool,
    pub verbose: bool,
}

/// What prune decided (one line per backup) and, with `--yes`, could not delete.
pub struct PruneReport {
    pub lines: Vec<String>,
    pub leftovers: Vec<String>,
}

/// A backup prune may consider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub kind: Kind,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Snapshot,
    Volume,
}

pub async fn prune(options: &PruneOptions) -> Result<PruneReport, Error> {
    if options.policy.is_empty() {
        return Err(Error::Usage(
            "give at least one rule: --keep-last, --keep-hourly, --keep-daily, --keep-weekly, --keep-monthly or --keep-yearly".into(),
        ));
    }
    let cloud = aws::connect().await.map_err(input)?;
    let (snapshots, volumes) = tokio::try_join!(
        cloud.snapshots_tagged(key::KEPT),
        cloud.tagged(ResourceKind::Volume, key::CREATED_VOLUME),
    )
    .map_err(input)?;
    let mut found: Vec<Candidate> = snapshots
        .into_iter()
        .filter(|s| s.state == "completed")
        .map(|s| Candidate {
            id: s.id,
            kind: Kind::Snapshot,
            tags: s.tags,
        })
        .collect();
    found.extend(
        volumes
            .into_iter()
            .filter(|v| v.state == "available")
            .map(|v| Candidate {
                id: v.id,
                kind: Kind::Volume,
                tags: v.tags,
            }),
    );
    let (items, by_id) = items(&found);
    let decisions = policy::decide(&items, &options.policy);
    let report = Reporter::new(options.verbose);
    let mut lines = Vec::new();
    let mut doomed = Vec::new();
    for d in &decisions {
        let c = &by_id[&d.id];
        lines.push(line(d, c, options.yes));
        if !d.keep {
            doomed.push(c.clone());
        }
    }
    let mut leftovers = Vec::new();
    if options.yes {
        for c in &doomed {
            if let Err(e) = delete(&cloud, c, &report).await {
                leftovers.push(format!("{} could not be deleted ({e})", c.id));
            }
        }
    }
    Ok(PruneReport { lines, leftovers })
}

/// The candidates prune may act on, as policy items; each by ID.
fn items(found: &[Candidate]) -> (Vec<Item>, BTreeMap<String, Candidate>) {
    let mut items = Vec::new();
    let mut by_id = BTreeMap::new();
    for c in found.iter().filter(|c| eligible(c)) {
        let Some(finished) = c
            .tags
            .get(key::FINISHED)
            .and_then(|f| policy::parse_finished(f))
        else {
            continue; // no finish time: not a backup prune can place; never deleted
        };
        items.push(Item {
            id: c.id.clone(),
            group: group(c),
            finished,
            complete: c.tags.get(key::COMPLETED).is_some_and(|v| v == "true"),
        });
        by_id.insert(c.id.clone(), c.clone());
    }
    (items, by_id)
}

/// Whether prune may ever delete it: made and finished by a run, not a user's.
fn eligible(c: &Candidate) -> bool {
    let tag = |k: &str| c.tags.get(k).map(String::as_str);
    let ours = tag(key::RUN).is_some() && tag(key::METHOD).is_some();
    ours && match c.kind {
        Kind::Snapshot => tag(key::KEPT) == Some("true"),
        Kind::Volume => {
            tag(key::CREATED_VOLUME) == Some("true") && tag(key::NAMED_VOLUME) != Some("true")
        }
    }
}

/// host, directory (its path hash, or the path for backups made before the hash was
/// recorded), method and kind.
fn group(c: &Candidate) -> String {
    let tag = |k: &str| c.tags.get(k).cloned().unwrap_or_default();
    let dir = c
        .tags
        .get(key::SOURCE_DIR_HASH)
        .cloned()
        .unwrap_or_else(|| format!("path:{}", tag(key::SOURCE_DIR)));
    let kind = match c.kind {
        Kind::Snapshot => "snapshot",
        Kind::Volume => "volume",
    };
    format!(
        "{}\u{0}{dir}\u{0}{}\u{0}{kind}",
        tag(key::SOURCE_HOST),
        tag(key::METHOD)
    )
}

fn line(d: &Decision, c: &Candidate, yes: bool) -> String {
    let verb = match (d.keep, yes) {
        (true, _) => "keep",
        (false, true) => "delete",
        (false, false) => "would delete",
    };
    let tag = |k: &str| c.tags.get(k).map(String::as_str).unwrap_or("?");
    format!(
        "{verb} {} ({} {} of {}:{}, finished {}): {}",
        d.id,
        tag(key::METHOD),
        match c.kind {
            Kind::Snapshot => "snapshot",
            Kind::Volume => "volume",
        },
        tag(key::SOURCE_HOST),
        crate::quote::c_escape(std::path::Path::new(tag(key::SOURCE_DIR))),
        tag(key::FINISHED),
        d.reasons.join(", ")
    )
}

/// Deletes a doomed backup after reading it again: it must still be eligible, with the same
/// finish time, and a volume must still be free.
async fn delete(cloud: &AwsCloud, c: &Candidate, report: &Reporter) -> Result<(), Error> {
    report.step(&format!("deleting {}", c.id));
    let same = |tags: &BTreeMap<String, String>| {
        let now = Candidate {
            id: c.id.clone(),
            kind: c.kind,
            tags: tags.clone(),
        };
        eligible(&now) && tags.get(key::FINISHED) == c.tags.get(key::FINISHED)
    };
    match c.kind {
        Kind::Snapshot => match cloud.describe_snapshot(&c.id).await? {
            Some(s) if same(&s.tags) => Ok(cloud.delete_snapshot(&c.id).await?),
            Some(_) => Err(Error::Invalid(
                "it changed since it was listed; kept".into(),
            )),
            None => Ok(()),
        },
        Kind::Volume => match cloud.describe_volume(&c.id).await? {
            Some(v) if same(&v.tags) && v.state == "available" => {
                Ok(cloud.delete_volume(&c.id).await?)
            }
            Some(_) => Err(Error::Invalid(
                "it changed or was attached since it was listed; kept".into(),
            )),
            None => Ok(()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: &str, kind: Kind, extra: &[(&str, &str)]) -> Candidate {
        let mut tags: BTreeMap<String, String> = [
            (key::RUN, "r"),
            (key::METHOD, "dd"),
            (key::SOURCE_HOST, "h"),
            (key::SOURCE_DIR, "/data"),
            (key::SOURCE_DIR_HASH, "abc"),
            (key::COMPLETED, "true"),
            (key::KEPT, "true"),
            (key::CREATED_VOLUME, "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            tags.insert(k.to_string(), v.to_string());
        }
        Candidate {
            id: id.into(),
            kind,
            tags,
        }
    }

    #[test]
    fn only_what_the_tool_made_and_finished_is_considered() {
        let day = |d: u32| format!("2026-11-{d:02}T03:00:00Z");
        let found = vec![
            cand("snap-1", Kind::Snapshot, &[(key::FINISHED, &day(1))]),
            cand("snap-2", Kind::Snapshot, &[(key::FINISHED, &day(2))]),
            // A user's snapshot copied from ours, never kept by a run: not a candidate.
            cand(
                "snap-user",
                Kind::Snapshot,
                &[(key::FINISHED, &day(3)), (key::KEPT, "no")],
            ),
            // A -v volume: never.
            cand(
                "vol-named",
                Kind::Volume,
                &[(key::FINISHED, &day(1)), (key::NAMED_VOLUME, "true")],
            ),
            // No finish time: cannot be placed, never deleted.
            cand("snap-nofinish", Kind::Snapshot, &[]),
            cand("vol-1", Kind::Volume, &[(key::FINISHED, &day(1))]),
            cand("vol-2", Kind::Volume, &[(key::FINISHED, &day(2))]),
        ];
        let (items, _) = items(&found);
        let ids: Vec<&str> = items.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["snap-1", "snap-2", "vol-1", "vol-2"]);
        // Snapshots and volumes are groups of their own: keep-last 1 keeps one of each.
        let policy = Policy {
            last: 1,
            ..Policy::default()
        };
        let kept: Vec<String> = policy::decide(&items, &policy)
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.id)
            .collect();
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(kept.contains(&"snap-2".to_string()) && kept.contains(&"vol-2".to_string()));
    }

    #[test]
    fn groups_are_the_exact_directory_not_its_cut_tag() {
        let a = cand("snap-a", Kind::Snapshot, &[(key::SOURCE_DIR_HASH, "h1")]);
        let b = cand("snap-b", Kind::Snapshot, &[(key::SOURCE_DIR_HASH, "h2")]);
        assert_ne!(
            group(&a),
            group(&b),
            "same cut path tag, different directories"
        );
        let c = cand("snap-c", Kind::Snapshot, &[(key::METHOD, "rsync")]);
        assert_ne!(group(&a), group(&c));
    }
}
