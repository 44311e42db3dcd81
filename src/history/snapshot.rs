//! Taking a snapshot of a backup volume: started with the backup's tags, recorded in the run's
//! ledger (so a failed or interrupted run deletes it), awaited until `completed` with
//! progress and a deadline, and only then kept (tagged `ec2-backup:kept`, forgotten by the
//! ledger). `gc` deletes a snapshot of a killed run that was never kept.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cloud::snapshot::Snapshots;
use crate::cloud::{CloudError, CloudResult, Tags};
use crate::ledger::{Ledger, Resource};
use crate::report::Reporter;
use crate::tags::key;

/// How long a snapshot may take to complete unless `EC2_BACKUP_SNAPSHOT_TIMEOUT` says (a
/// volume's first snapshot copies every written block: on EC2 tens of MiB/s).
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(3 * 3600);

/// The deadline for a snapshot to complete, from `EC2_BACKUP_SNAPSHOT_TIMEOUT` (seconds).
pub fn limit_from_env() -> Result<Duration, String> {
    match std::env::var("EC2_BACKUP_SNAPSHOT_TIMEOUT") {
        Err(_) => Ok(DEFAULT_LIMIT),
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(s) if s > 0 => Ok(Duration::from_secs(s)),
            _ => Err(format!(
                "EC2_BACKUP_SNAPSHOT_TIMEOUT is '{text}', not a number of seconds"
            )),
        },
    }
}

/// Starts a snapshot of `volume` and records it in `ledger` the moment EC2 answers.
pub async fn start<C: Snapshots>(
    cloud: &C,
    ledger: &Arc<Ledger>,
    volume: &str,
    description: &str,
    tags: &Tags,
) -> CloudResult<String> {
    let (c, v, d, t) = (
        cloud.clone(),
        volume.to_string(),
        description.to_string(),
        tags.clone(),
    );
    ledger
        .create(
            async move { c.create_snapshot(&v, &d, &t).await },
            |id: &String| Resource::Snapshot(id.clone()),
        )
        .await
}

/// Waits until the snapshot is `completed`: progress on a terminal, the state in verbose
/// steps; an `error` state, a vanished snapshot or the deadline fail.
pub async fn wait_completed<C: Snapshots>(
    cloud: &C,
    id: &str,
    limit: Duration,
    report: &Reporter,
) -> CloudResult<()> {
    const ACTION: &str = "Waiting for the snapshot";
    let bar = progress_bar();
    let deadline = Instant::now() + limit;
    let mut interval = FIRST_POLL;
    let mut shown = String::new();
    let mut pace = Pace::default();
    loop {
        let Some(s) = cloud.describe_snapshot(id).await? else {
            return Err(CloudError::new(
                ACTION,
                format!("the snapshot {id} is gone"),
            ));
        };
        let progress = s.progress.clone().unwrap_or_default();
        let pct = percent(&progress);
        if let Some(p) = pct {
            bar.set_position(p);
        }
        let state = format!("{} {progress}", s.state);
        if state != shown {
            report.step(&format!("snapshot {id}: {}", state.trim()));
            shown = state;
        }
        match s.state.as_str() {
            "completed" => {
                bar.finish_and_clear();
                return Ok(());
            }
            "error" => {
                bar.abandon();
                return Err(CloudError::new(
                    ACTION,
                    format!(
                        "EC2 reports the snapshot {id} failed ({})",
                        s.message.unwrap_or_else(|| "no reason given".into())
                    ),
                ));
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            bar.abandon();
            return Err(CloudError::new(
                ACTION,
                format!(
                    "the snapshot {id} was not completed within {} s (last: {}); raise EC2_BACKUP_SNAPSHOT_TIMEOUT",
                    limit.as_secs(),
                    shown.trim()
                ),
            ));
        }
        tokio::time::sleep(pace.next(interval, pct, Instant::now())).await;
        // Snapshots take seconds to hours: a few polls early, then one every 5 s (far below
        // DescribeSnapshots' request limits).
        interval = (interval * 3 / 2).min(Duration::from_secs(5));
    }
}

/// The first poll: a small snapshot (a `--direct` one just sealed) can complete within a
/// tenth of a second.
const FIRST_POLL: Duration = Duration::from_millis(50);

/// When to poll next, from the progress seen so far: when the percentage has moved since the
/// last poll and its pace says the end comes before the regular interval, poll about then
/// (not sooner than [`FIRST_POLL`]). A progress that stands still (EC2 often sits at 99%)
/// gets the regular, growing interval.
#[derive(Debug, Default)]
struct Pace {
    first: Option<(Instant, u64)>,
    last: Option<u64>,
}

impl Pace {
    fn next(&mut self, interval: Duration, pct: Option<u64>, now: Instant) -> Duration {
        let Some(p) = pct else {
            return interval;
        };
        let moved = self.last.is_some_and(|l| p > l);
        self.last = Some(p);
        let (t0, p0) = *self.first.get_or_insert((now, p));
        if !moved || p <= p0 || p >= 100 {
            return interval;
        }
        let eta = now
            .duration_since(t0)
            .mul_f64((100 - p) as f64 / (p - p0) as f64);
        interval.min(eta.max(FIRST_POLL))
    }
}

/// Marks a completed snapshot as kept and takes it off the ledger: from now on it is a
/// backup, which no cleanup, `gc` or failure deletes (only `prune`, by its policy).
pub async fn keep<C: Snapshots>(cloud: &C, ledger: &Ledger, id: &str) -> CloudResult<()> {
    cloud
        .create_tags(id, &vec![(key::KEPT.to_string(), "true".to_string())])
        .await?;
    ledger.forget(&Resource::Snapshot(id.to_string()));
    Ok(())
}

/// Deletes a snapshot this tool made, marking it first (`ec2-backup:deleting`): EC2 takes
/// the deletion of a pending snapshot only once it completes, and until then shows it as
/// pending; the mark tells `gc` and `list` that nothing is left to do. A mark that cannot be
/// set does not stop the deletion.
pub async fn discard<C: Snapshots>(cloud: &C, id: &str) -> CloudResult<()> {
    let mark = vec![(key::DELETING.to_string(), "true".to_string())];
    if let Err(e) = cloud.create_tags(id, &mark).await {
        if e.code
            .as_deref()
            .is_some_and(|c| c.starts_with("InvalidSnapshot.NotFound"))
        {
            return Ok(());
        }
    }
    cloud.delete_snapshot(id).await
}

fn percent(progress: &str) -> Option<u64> {
    progress.trim().trim_end_matches('%').parse::<u64>().ok()
}

/// Percent done on stderr, drawn only when stderr is a terminal.
fn progress_bar() -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(100),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("snapshot {pos:>3}% {wide_bar} {elapsed}")
    {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::fake::{FakeCloud, Faulty};
    use crate::cloud::Cloud;

    #[test]
    fn polls_come_when_the_progress_says_the_end_is_near() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut pace = Pace::default();
        // The first sight sets the origin: the regular interval.
        assert_eq!(pace.next(ms(500), Some(10), t), ms(500));
        // 10% -> 60% in 100 ms: 40% more takes ~80 ms, sooner than the interval.
        let eta = pace.next(ms(500), Some(60), t + ms(100));
        assert!(eta >= ms(79) && eta <= ms(81), "{eta:?}");
        // Never sooner than the first poll's pause.
        assert_eq!(pace.next(ms(500), Some(99), t + ms(110)), FIRST_POLL);
        // Standing still at 99%: the regular interval again.
        assert_eq!(pace.next(ms(750), Some(99), t + ms(200)), ms(750));
        // A slow pace never waits longer than the interval.
        let mut slow = Pace::default();
        slow.next(ms(5000), Some(1), t);
        assert_eq!(slow.next(ms(5000), Some(2), t + ms(60_000)), ms(5000));
        // No progress reported: the interval.
        assert_eq!(Pace::default().next(ms(300), None, t), ms(300));
    }

    #[test]
    fn progress_is_read_as_percent() {
        assert_eq!(percent("42%"), Some(42));
        assert_eq!(percent("100%"), Some(100));
        assert_eq!(percent(""), None);
    }

    #[tokio::test]
    async fn a_snapshot_is_on_the_ledger_until_kept() {
        let fake = FakeCloud::default();
        let v = fake.create_volume("fake-1a", 1, &vec![]).await.unwrap();
        let ledger = Arc::new(Ledger::default());
        let id = start(&fake, &ledger, &v, "d", &vec![]).await.unwrap();
        assert_eq!(ledger.snapshot(), vec![Resource::Snapshot(id.clone())]);
        wait_completed(&fake, &id, Duration::from_secs(5), &Reporter::new(false))
            .await
            .unwrap();
        keep(&fake, &ledger, &id).await.unwrap();
        assert!(ledger.snapshot().is_empty());
    }

    #[tokio::test]
    async fn a_failed_wait_leaves_the_snapshot_to_the_unwind() {
        let fake = FakeCloud::default();
        let faulty = Faulty::new(fake.clone());
        faulty.fail("DescribeSnapshots", "RequestLimitExceeded", 1, 1);
        let v = fake.create_volume("fake-1a", 1, &vec![]).await.unwrap();
        let ledger = Arc::new(Ledger::default());
        let id = start(&faulty, &ledger, &v, "d", &vec![]).await.unwrap();
        let quiet = Reporter::new(false);
        let waited = wait_completed(&faulty, &id, Duration::from_secs(5), &quiet).await;
        assert!(waited.is_err());
        let left = ledger.unwind(&faulty, None, &Reporter::new(false)).await;
        assert!(left.is_empty(), "{left:?}");
        assert!(
            fake.snapshots().is_empty(),
            "the unkept snapshot was deleted"
        );
        let marked = format!("CreateTags {id}");
        assert!(
            fake.calls().contains(&marked),
            "marked as being deleted first"
        );
        assert!(fake.volume(&v).is_some(), "the volume is not the ledger's");
    }
}
