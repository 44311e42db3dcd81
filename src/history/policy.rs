//! Retention policy for `prune`: decides which backups to keep and which to
//! remove, without touching AWS.
//!
//! The rules follow restic's `forget` policy so that users can reuse what
//! they already know: calendar rules work on natural UTC boundaries (ISO
//! weeks run Monday to Sunday), only count periods that actually hold a
//! backup, keep the newest backup of each such period, and a backup is kept
//! if any rule wants it. Like restic, when a calendar rule asks for more
//! periods than exist, the oldest backup is kept as well, so that the
//! longest possible history survives.
//!
//! Two safety rules are ours, not restic's: an incomplete backup never
//! satisfies a rule (it must not stand in for a good one), and the newest
//! backup of each group always survives, so a prune can never empty a group.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Utc};

/// One backup as the prune command sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub id: String,
    /// Opaque key (host, directory hash, method) computed by the caller; the
    /// policy is applied to each group on its own so that unrelated backup
    /// sets never crowd each other out.
    pub group: String,
    pub finished: DateTime<Utc>,
    /// False for backups that did not finish; they never count as kept copies.
    pub complete: bool,
}

/// How many backups each rule keeps; 0 means the rule is not used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}

impl Policy {
    /// True when no rule is used. The caller refuses such a policy, because
    /// it would remove everything but the newest backup of each group.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The verdict for one input item, with short human-readable reasons: why it
/// is kept (every rule it satisfies), or why it is removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub group: String,
    pub keep: bool,
    pub reasons: Vec<String>,
}

/// The calendar periods a rule can bucket backups by.
#[derive(Debug, Clone, Copy)]
enum Period {
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Period {
    /// The rule name plus the bucket of `t`, e.g. "weekly 2026-W48"; it is
    /// both the bucket key and the reason shown to the user. Weeks use the
    /// ISO week-numbering year (as restic does), so the last days of December
    /// can belong to week 1 of the next year and vice versa.
    fn label(self, t: DateTime<Utc>) -> String {
        match self {
            Period::Hourly => format!("hourly {}", t.format("%Y-%m-%d %Hh")),
            Period::Daily => format!("daily {}", t.format("%Y-%m-%d")),
            Period::Weekly => {
                let week = t.iso_week();
                format!("weekly {}-W{:02}", week.year(), week.week())
            }
            Period::Monthly => format!("monthly {}", t.format("%Y-%m")),
            Period::Yearly => format!("yearly {}", t.year()),
        }
    }
}

/// Decides, for every item, whether `prune` keeps or removes it.
///
/// The output holds exactly one decision per input item, ordered by group and
/// then newest first, independent of input order, so that dry runs and real
/// runs print the same list. Items finished at the same instant are ordered
/// by id (ascending id counts as newer) to keep the result deterministic.
pub fn decide(items: &[Item], policy: &Policy) -> Vec<Decision> {
    let mut groups: BTreeMap<&str, Vec<&Item>> = BTreeMap::new();
    for item in items {
        groups.entry(item.group.as_str()).or_default().push(item);
    }
    let mut decisions = Vec::with_capacity(items.len());
    for members in groups.values_mut() {
        members.sort_by(|a, b| b.finished.cmp(&a.finished).then_with(|| a.id.cmp(&b.id)));
        decide_group(members, policy, &mut decisions);
    }
    decisions
}

/// Applies the policy to one group, already sorted newest first.
fn decide_group(members: &[&Item], policy: &Policy, out: &mut Vec<Decision>) {
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); members.len()];
    // Only complete items take part in the rules, so an incomplete one can
    // neither be kept by a rule nor use up a rule's slot.
    let complete: Vec<usize> = (0..members.len())
        .filter(|&i| members[i].complete)
        .collect();

    for (rank, &i) in complete.iter().take(policy.last as usize).enumerate() {
        reasons[i].push(format!("last {}", rank + 1));
    }

    let rules = [
        (Period::Hourly, policy.hourly),
        (Period::Daily, policy.daily),
        (Period::Weekly, policy.weekly),
        (Period::Monthly, policy.monthly),
        (Period::Yearly, policy.yearly),
    ];
    for (period, count) in rules {
        let mut left = count as usize;
        let mut previous: Option<String> = None;
        for (pos, &i) in complete.iter().enumerate() {
            if left == 0 {
                break;
            }
            let label = period.label(members[i].finished);
            if previous.as_deref() != Some(label.as_str()) {
                // Newest first, so the first item seen in a bucket is its
                // newest; periods without backups are never seen and so
                // never use up a slot.
                reasons[i].push(label.clone());
                left -= 1;
                previous = Some(label);
            } else if pos + 1 == complete.len() {
                // restic: slots left over at the end keep the oldest backup.
                reasons[i].push(format!("oldest {label}"));
            }
        }
    }

    if let Some(newest) = reasons.first_mut() {
        newest.push("newest of its group".to_string());
    }

    for (item, mut why) in members.iter().zip(reasons) {
        let keep = !why.is_empty();
        if !keep {
            why.push(if item.complete {
                "not kept by any rule".to_string()
            } else {
                "incomplete backup".to_string()
            });
        }
        out.push(Decision {
            id: item.id.clone(),
            group: item.group.clone(),
            keep,
            reasons: why,
        });
    }
}

/// Parses a finish time as the tool records it: RFC 3339, with `Z` or a
/// numeric offset and optional fractional seconds, normalised to UTC.
/// Surrounding whitespace is ignored, since values may come from files.
pub fn parse_finished(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, group: &str, finished: &str, complete: bool) -> Item {
        Item {
            id: id.to_string(),
            group: group.to_string(),
            finished: parse_finished(finished).expect("test timestamp"),
            complete,
        }
    }

    /// Items of group "g", all complete.
    fn items(list: &[(&str, &str)]) -> Vec<Item> {
        list.iter().map(|(id, t)| item(id, "g", t, true)).collect()
    }

    fn policy(set: impl FnOnce(&mut Policy)) -> Policy {
        let mut policy = Policy::default();
        set(&mut policy);
        policy
    }

    fn kept(decisions: &[Decision]) -> Vec<&str> {
        decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id.as_str())
            .collect()
    }

    fn reasons<'a>(decisions: &'a [Decision], id: &str) -> &'a [String] {
        &decisions.iter().find(|d| d.id == id).expect(id).reasons
    }

    #[test]
    fn keep_last_alone() {
        let input = items(&[
            ("a", "2026-11-27T10:00:00Z"),
            ("c", "2026-11-29T10:00:00Z"),
            ("d", "2026-11-30T10:00:00Z"),
            ("b", "2026-11-28T10:00:00Z"),
        ]);
        let out = decide(&input, &policy(|p| p.last = 2));
        assert_eq!(kept(&out), ["d", "c"]);
        assert_eq!(reasons(&out, "d"), ["last 1", "newest of its group"]);
        assert_eq!(reasons(&out, "c"), ["last 2"]);
        assert_eq!(reasons(&out, "a"), ["not kept by any rule"]);
    }

    #[test]
    fn daily_skips_days_without_backups() {
        let input = items(&[
            ("nov30", "2026-11-30T03:00:00Z"),
            ("nov27", "2026-11-27T03:00:00Z"),
            ("nov20", "2026-11-20T03:00:00Z"),
            ("nov10", "2026-11-10T03:00:00Z"),
        ]);
        let out = decide(&input, &policy(|p| p.daily = 3));
        assert_eq!(kept(&out), ["nov30", "nov27", "nov20"]);
        assert_eq!(reasons(&out, "nov20"), ["daily 2026-11-20"]);
        assert_eq!(reasons(&out, "nov10"), ["not kept by any rule"]);
    }

    #[test]
    fn newest_of_each_day_is_kept() {
        let input = items(&[
            ("30-early", "2026-11-30T08:00:00Z"),
            ("29-late", "2026-11-29T23:00:00Z"),
            ("30-late", "2026-11-30T20:00:00Z"),
            ("29-early", "2026-11-29T10:00:00Z"),
            ("28", "2026-11-28T12:00:00Z"),
        ]);
        let out = decide(&input, &policy(|p| p.daily = 2));
        assert_eq!(kept(&out), ["30-late", "29-late"]);
    }

    #[test]
    fn iso_week_spans_the_year_boundary() {
        // 2026-12-31 (Thu) and 2027-01-01 (Fri) are both in 2026-W53;
        // 2027-01-04 is the Monday that starts 2027-W01.
        let input = items(&[
            ("dec24", "2026-12-24T12:00:00Z"),
            ("dec31", "2026-12-31T12:00:00Z"),
            ("jan01", "2027-01-01T12:00:00Z"),
            ("jan04", "2027-01-04T12:00:00Z"),
        ]);
        let out = decide(&input, &policy(|p| p.weekly = 3));
        assert_eq!(kept(&out), ["jan04", "jan01", "dec24"]);
        assert_eq!(reasons(&out, "jan01"), ["weekly 2026-W53"]);
        assert_eq!(reasons(&out, "dec24"), ["weekly 2026-W52"]);
        assert_eq!(reasons(&out, "dec31"), ["not kept by any rule"]);
    }

    #[test]
    fn one_item_satisfies_monthly_and_yearly() {
        let input = items(&[
            ("nov30", "2026-11-30T12:00:00Z"),
            ("nov15", "2026-11-15T12:00:00Z"),
            ("oct31", "2026-10-31T12:00:00Z"),
            ("y25-dec", "2025-12-31T12:00:00Z"),
            ("y25-jun", "2025-06-01T12:00:00Z"),
        ]);
        let out = decide(&input, &policy(|p| (p.monthly, p.yearly) = (2, 2)));
        assert_eq!(kept(&out), ["nov30", "oct31", "y25-dec"]);
        assert_eq!(
            reasons(&out, "nov30"),
            ["monthly 2026-11", "yearly 2026", "newest of its group"]
        );
        assert_eq!(reasons(&out, "oct31"), ["monthly 2026-10"]);
        assert_eq!(reasons(&out, "y25-dec"), ["yearly 2025"]);
    }

    #[test]
    fn incomplete_items_are_never_kept_by_rules_and_use_no_slots() {
        let input = vec![
            item("broken-new", "g", "2026-11-30T12:00:00Z", false),
            item("good-30", "g", "2026-11-30T08:00:00Z", true),
            item("broken-29", "g", "2026-11-29T08:00:00Z", false),
            item("good-28", "g", "2026-11-28T08:00:00Z", true),
            item("good-27", "g", "2026-11-27T08:00:00Z", true),
        ];
        let out = decide(&input, &policy(|p| (p.last, p.daily) = (1, 2)));
        assert_eq!(kept(&out), ["broken-new", "good-30", "good-28"]);
        assert_eq!(reasons(&out, "broken-new"), ["newest of its group"]);
        assert_eq!(reasons(&out, "good-30"), ["last 1", "daily 2026-11-30"]);
        assert_eq!(reasons(&out, "broken-29"), ["incomplete backup"]);
        assert_eq!(reasons(&out, "good-27"), ["not kept by any rule"]);
    }

    #[test]
    fn oldest_is_kept_when_a_rule_has_slots_left() {
        // restic: not enough days for `daily 5`, so the oldest backup is kept
        // too, even though its day is already represented.
        let input = items(&[
            ("nov30", "2026-11-30T12:00:00Z"),
            ("nov29-late", "2026-11-29T20:00:00Z"),
            ("nov29-mid", "2026-11-29T12:00:00Z"),
            ("nov29-early", "2026-11-29T04:00:00Z"),
        ]);
        let out = decide(&input, &policy(|p| p.daily = 5));
        assert_eq!(kept(&out), ["nov30", "nov29-late", "nov29-early"]);
        assert_eq!(reasons(&out, "nov29-early"), ["oldest daily 2026-11-29"]);
        assert_eq!(reasons(&out, "nov29-mid"), ["not kept by any rule"]);
    }

    #[test]
    fn groups_are_independent() {
        let input = vec![
            item("a-new", "a", "2026-11-30T12:00:00Z", true),
            item("a-old", "a", "2026-11-28T12:00:00Z", true),
            item("b-new", "b", "2026-11-20T12:00:00Z", true),
            item("b-old", "b", "2026-11-19T12:00:00Z", true),
        ];
        let out = decide(&input, &policy(|p| p.last = 1));
        assert_eq!(kept(&out), ["a-new", "b-new"]);
        assert_eq!(reasons(&out, "b-new"), ["last 1", "newest of its group"]);
    }

    #[test]
    fn output_order_is_stable() {
        let mut input = vec![
            item("b2", "b", "2026-11-02T00:00:00Z", true),
            item("a1", "a", "2026-11-01T00:00:00Z", true),
            item("b3", "b", "2026-11-03T00:00:00Z", false),
            item("a3", "a", "2026-11-03T00:00:00Z", true),
            item("b1", "b", "2026-11-01T00:00:00Z", true),
            item("a2", "a", "2026-11-02T00:00:00Z", true),
        ];
        let policy = policy(|p| p.daily = 1);
        let out = decide(&input, &policy);
        let ids: Vec<&str> = out.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["a3", "a2", "a1", "b3", "b2", "b1"]);
        assert!(out.iter().all(|d| d.id.starts_with(&d.group)));
        input.reverse();
        assert_eq!(decide(&input, &policy), out);
    }

    #[test]
    fn ties_in_finished_time_are_broken_by_id() {
        let forward = items(&[("b", "2026-11-30T12:00:00Z"), ("a", "2026-11-30T12:00:00Z")]);
        let mut backward = forward.clone();
        backward.reverse();
        let policy = policy(|p| p.last = 1);
        for input in [forward, backward] {
            let out = decide(&input, &policy);
            assert_eq!(kept(&out), ["a"]);
            assert_eq!(reasons(&out, "b"), ["not kept by any rule"]);
        }
    }

    #[test]
    fn hourly_buckets_by_utc_hour() {
        let input = vec![
            item("14-late", "g", "2026-11-30T14:55:00Z", true),
            item("14-early", "g", "2026-11-30T14:05:00Z", true),
            // 15:30 at +02:00 is 13:30 UTC.
            item("13", "g", "2026-11-30T15:30:00+02:00", true),
        ];
        let out = decide(&input, &policy(|p| p.hourly = 2));
        assert_eq!(kept(&out), ["14-late", "13"]);
        assert_eq!(reasons(&out, "13"), ["hourly 2026-11-30 13h"]);
    }

    #[test]
    fn empty_policy_keeps_only_the_newest() {
        assert!(Policy::default().is_empty());
        assert!(!policy(|p| p.yearly = 1).is_empty());
        let input = items(&[
            ("new", "2026-11-30T12:00:00Z"),
            ("old", "2026-11-01T12:00:00Z"),
        ]);
        assert_eq!(kept(&decide(&input, &Policy::default())), ["new"]);
    }

    #[test]
    fn parse_finished_accepts_rfc3339_forms() {
        let plain = parse_finished("2026-11-30T14:05:09Z").unwrap();
        assert_eq!(plain.to_rfc3339(), "2026-11-30T14:05:09+00:00");
        let fraction = parse_finished("2026-11-30T14:05:09.250Z").unwrap();
        assert_eq!(fraction.timestamp_subsec_millis(), 250);
        let offset = parse_finished("2026-11-30T16:05:09+02:00").unwrap();
        assert_eq!(offset, plain);
        assert_eq!(parse_finished(" 2026-11-30T14:05:09Z\n"), Some(plain));
        assert_eq!(parse_finished("2026-11-30 14:05"), None);
        assert_eq!(parse_finished("yesterday"), None);
    }
}
