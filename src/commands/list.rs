//! `ec2-backup list [--json]`: the backups in the region, from the tool's tags: the volumes
//! a run finished (tagged `ec2-backup:finished`) and the snapshots a run kept (completed,
//! tagged `ec2-backup:kept`), newest first. A volume that was never a backup (a `-v` volume
//! whose first run failed, a volume being written now) and a snapshot a run is still waiting
//! for, or that a failed run left, are not listed.

use std::collections::BTreeMap;

use serde_json::json;

use crate::cloud::aws;
use crate::cloud::snapshot::{Snapshot, Snapshots};
use crate::cloud::{Cloud, ResourceKind, Tagged};
use crate::error::Error;
use crate::helper::plan::input;
use crate::tags::key;

/// One backup, as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub kind: &'static str,
    pub method: String,
    pub source_host: String,
    pub source_dir: String,
    pub finished: String,
    pub size_gib: Option<i32>,
    pub bytes: Option<u64>,
    pub complete: bool,
    /// How many exclude patterns it was made with (0: none).
    pub excludes: u64,
    pub one_file_system: bool,
}

pub async fn run() -> Result<Vec<Entry>, Error> {
    let cloud = aws::connect().await.map_err(input)?;
    let (volumes, snapshots) = tokio::try_join!(
        cloud.tagged(ResourceKind::Volume, key::FINISHED),
        cloud.snapshots_tagged(key::KEPT),
    )
    .map_err(input)?;
    Ok(entries(&volumes, &snapshots))
}

/// The backups among `volumes` and `snapshots`, newest first.
pub fn entries(volumes: &[Tagged], snapshots: &[Snapshot]) -> Vec<Entry> {
    let mut list: Vec<Entry> = volumes
        .iter()
        .filter(|v| !matches!(v.state.as_str(), "deleting" | "deleted"))
        .filter_map(|v| entry(v.id.clone(), "volume", v.size_gib, &v.tags))
        .chain(
            snapshots
                .iter()
                .filter(|s| s.state == "completed")
                .filter(|s| s.tags.get(key::KEPT).is_some_and(|k| k == "true"))
                .filter(|s| !s.tags.contains_key(key::DELETING))
                .filter_map(|s| entry(s.id.clone(), "snapshot", s.size_gib, &s.tags)),
        )
        .collect();
    list.sort_by(|a, b| b.finished.cmp(&a.finished).then(a.id.cmp(&b.id)));
    list
}

fn entry(
    id: String,
    kind: &'static str,
    size_gib: Option<i32>,
    tags: &BTreeMap<String, String>,
) -> Option<Entry> {
    let tag = |k: &str| tags.get(k).cloned().unwrap_or_default();
    let method = tags.get(key::METHOD)?.clone();
    let finished = tags.get(key::FINISHED)?.clone();
    Some(Entry {
        id,
        kind,
        method,
        source_host: tag(key::SOURCE_HOST),
        source_dir: tag(key::SOURCE_DIR),
        finished,
        size_gib,
        bytes: tags.get(key::BYTES).and_then(|b| b.parse().ok()),
        complete: tags.get(key::COMPLETED).is_some_and(|c| c == "true"),
        excludes: tags
            .get(key::EXCLUDES)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        one_file_system: tags.get(key::ONE_FILE_SYSTEM).is_some_and(|v| v == "true"),
    })
}

/// `--json`: one array of objects.
pub fn json(list: &[Entry]) -> String {
    serde_json::Value::Array(
        list.iter()
            .map(|e| {
                json!({
                    "id": e.id,
                    "kind": e.kind,
                    "method": e.method,
                    "source_host": e.source_host,
                    "source_dir": e.source_dir,
                    "finished": e.finished,
                    "size_gib": e.size_gib,
                    "bytes": e.bytes,
                    "complete": e.complete,
                    "excludes": e.excludes,
                    "one_file_system": e.one_file_system,
                })
            })
            .collect(),
    )
    .to_string()
}

/// What a backup left out, in one word: `-` (nothing), the number of exclude patterns,
/// `xdev` for --one-file-system (as find calls it), or both (`3,xdev`).
fn left_out(e: &Entry) -> String {
    match (e.excludes, e.one_file_system) {
        (0, false) => "-".into(),
        (0, true) => "xdev".into(),
        (n, false) => n.to_string(),
        (n, true) => format!("{n},xdev"),
    }
}

/// A table with a header; the directory comes last (it may hold spaces) and is escaped.
pub fn table(list: &[Entry]) -> String {
    let mut lines = vec![format!(
        "{:<22} {:<8} {:<6} {:<20} {:>5} {:>12} {:<10} {:<8} {} {}",
        "ID",
        "KIND",
        "METHOD",
        "FINISHED",
        "GIB",
        "BYTES",
        "COMPLETE",
        "EXCLUDES",
        "HOST",
        "DIRECTORY"
    )];
    for e in list {
        lines.push(format!(
            "{:<22} {:<8} {:<6} {:<20} {:>5} {:>12} {:<10} {:<8} {} {}",
            e.id,
            e.kind,
            e.method,
            e.finished,
            e.size_gib
                .map(|s| s.to_string())
                .unwrap_or_else(|| "-".into()),
            e.bytes.map(|b| b.to_string()).unwrap_or_else(|| "-".into()),
            if e.complete { "yes" } else { "no" },
            left_out(e),
            e.source_host,
            crate::quote::c_escape(std::path::Path::new(&e.source_dir)),
        ));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(id: &str, tags: &[(&str, &str)]) -> Tagged {
        Tagged {
            id: id.into(),
            state: "available".into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            launched: None,
            size_gib: Some(2),
        }
    }

    fn snap(id: &str, state: &str, tags: &[(&str, &str)]) -> Snapshot {
        Snapshot {
            id: id.into(),
            state: state.into(),
            progress: None,
            volume_id: None,
            size_gib: Some(3),
            started: None,
            message: None,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn kept_completed_snapshots_are_listed_beside_volumes() {
        let backup = [
            (key::METHOD, "dd"),
            (key::FINISHED, "2026-01-02T00:00:00Z"),
            (key::COMPLETED, "true"),
        ];
        let kept = [backup.as_slice(), &[(key::KEPT, "true")]].concat();
        let list = entries(
            &[vol("vol-1", &backup)],
            &[
                snap("snap-kept", "completed", &kept),
                snap("snap-waiting", "pending", &kept),
                snap("snap-unkept", "completed", &backup),
            ],
        );
        let ids: Vec<(&str, &str)> = list.iter().map(|e| (e.id.as_str(), e.kind)).collect();
        assert_eq!(ids, [("snap-kept", "snapshot"), ("vol-1", "volume")]);
        assert_eq!(list[0].size_gib, Some(3));
    }

    #[test]
    fn only_finished_backups_newest_first() {
        let list = entries(
            &[
                vol(
                    "vol-old",
                    &[
                        (key::METHOD, "dd"),
                        (key::FINISHED, "2026-01-01T00:00:00Z"),
                        (key::COMPLETED, "true"),
                        (key::BYTES, "10"),
                        (key::EXCLUDES, "2"),
                        (key::ONE_FILE_SYSTEM, "true"),
                    ],
                ),
                vol(
                    "vol-new",
                    &[
                        (key::METHOD, "rsync"),
                        (key::FINISHED, "2026-02-01T00:00:00Z"),
                        (key::COMPLETED, "false"),
                    ],
                ),
                vol(
                    "vol-busy",
                    &[(key::METHOD, "dd"), (key::COMPLETED, "false")],
                ),
                vol("vol-users", &[(key::FINISHED, "2026-03-01T00:00:00Z")]),
            ],
            &[],
        );
        let ids: Vec<&str> = list.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["vol-new", "vol-old"]);
        assert!(!list[0].complete && list[1].complete);
        assert_eq!(list[1].bytes, Some(10));
        let v: serde_json::Value = serde_json::from_str(&json(&list)).unwrap();
        for k in [
            "id",
            "kind",
            "method",
            "source_host",
            "source_dir",
            "finished",
            "size_gib",
            "bytes",
            "complete",
            "excludes",
            "one_file_system",
        ] {
            assert!(v[0].get(k).is_some(), "{k}");
        }
        assert_eq!(v[0]["kind"], "volume");
        assert_eq!(v[1]["excludes"], 2);
        assert_eq!(v[0]["excludes"], 0);
        let t = table(&list);
        assert!(t.lines().nth(2).unwrap().contains(" 2,xdev "), "{t}");
        assert!(t.lines().nth(1).unwrap().contains(" -        "), "{t}");
    }
}
