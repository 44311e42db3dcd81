//! Waiting for cloud state: poll with short, slowly growing intervals under one deadline.
//! No fixed sleeps: a state that is reached quickly is noticed quickly.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use super::{Cloud, CloudError, CloudResult, Instance, Volume};

/// What one poll says.
pub enum Poll<T> {
    Ready(T),
    Pending(String),
}

/// Polls `check` until it is ready, it fails, or `limit` passes (then the error says what was
/// awaited and the last state seen).
pub async fn until<T, F, Fut>(what: &'static str, limit: Duration, check: F) -> CloudResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = CloudResult<Poll<T>>>,
{
    until_poked(what, limit, &Notify::new(), check).await
}

/// [`until`], polling again at once, then tightly, whenever `poke` is notified.
async fn until_poked<T, F, Fut>(
    what: &'static str,
    limit: Duration,
    poke: &Notify,
    mut check: F,
) -> CloudResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = CloudResult<Poll<T>>>,
{
    let deadline = Instant::now() + limit;
    let mut interval = Duration::from_millis(50);
    loop {
        match check().await? {
            Poll::Ready(v) => return Ok(v),
            Poll::Pending(state) => {
                if Instant::now() >= deadline {
                    return Err(CloudError::new(
                        what,
                        format!("gave up after {} s (last state: {state})", limit.as_secs()),
                    ));
                }
            }
        }
        let poked = tokio::select! {
            () = tokio::time::sleep(interval) => false,
            () = poke.notified() => true,
        };
        // Tight at first (the simulator and a fast EC2 answer within a second), then capped
        // low: a state reached is noticed within half a second. About ten Describe calls in
        // the first two seconds, two a second after: far below EC2's request rate limits.
        // A poke starts the tight polls over: the change it announces may take EC2 a
        // moment to report.
        interval = match poked {
            true => Duration::from_millis(50),
            false => (interval * 4 / 3).min(Duration::from_millis(500)),
        };
    }
}

/// One poll of a starting instance, shared by everything that waits on it (its address for
/// ssh, its running state for the attach): one Describe call at a time however many wait.
pub struct InstanceWatch {
    seen: watch::Sender<Option<Instance>>,
    poke: Notify,
}

impl Default for InstanceWatch {
    fn default() -> Self {
        InstanceWatch {
            seen: watch::Sender::new(None),
            poke: Notify::new(),
        }
    }
}

impl InstanceWatch {
    /// A waiter: [`Waiter::running`] or [`Waiter::address`] on it. The poll goes on while
    /// any waiter is left.
    pub fn waiter(&self) -> Waiter {
        Waiter(self.seen.subscribe())
    }

    /// Polls at once, and tightly for a while, instead of after the pause the poll has
    /// grown to (someone knows the instance has just changed).
    pub fn poke(&self) {
        self.poke.notify_one();
    }

    /// Describes the instance until every waiter is done, publishing what it sees. Fails
    /// if the instance will never start (neither pending nor running) or `limit` passes.
    pub async fn poll<C: Cloud>(&self, cloud: &C, id: &str, limit: Duration) -> CloudResult<()> {
        let what = "Waiting for the helper instance to start";
        let polls = until_poked(what, limit, &self.poke, || async {
            let Some(i) = cloud.describe_instance(id).await? else {
                return Ok(Poll::Pending("not visible yet".into()));
            };
            if !matches!(i.state.as_str(), "pending" | "running") {
                return Err(CloudError::new(
                    what,
                    format!("the instance {id} is {} instead of running", i.state),
                ));
            }
            let state = i.state.clone();
            self.seen.send_replace(Some(i));
            Ok(Poll::Pending(state))
        });
        tokio::select! {
            r = polls => r,
            () = self.seen.closed() => Ok(()),
        }
    }
}

/// Something waiting on an [`InstanceWatch`]; dropping it (done) lets the poll stop.
pub struct Waiter(watch::Receiver<Option<Instance>>);

impl Waiter {
    /// Waits until the instance is running with an address; returns it as then described.
    pub async fn running(mut self) -> Instance {
        self.until(|i| i.state == "running").await
    }

    /// Waits until the helper has the address it will keep: as soon as a public one is
    /// known, which is often while the instance is still pending (ssh can then be tried
    /// while it boots), or else once it is running. Returns that address.
    pub async fn address(mut self) -> String {
        let i = self
            .until(|i| i.state == "running" || (i.state == "pending" && i.public_address))
            .await;
        i.address.unwrap_or_default()
    }

    /// Waits until the instance has an address and `ready` holds.
    async fn until(&mut self, ready: impl Fn(&Instance) -> bool) -> Instance {
        let wanted = |seen: &Option<Instance>| {
            seen.as_ref()
                .is_some_and(|i| i.address.is_some() && ready(i))
        };
        match self.0.wait_for(wanted).await {
            Ok(seen) => seen.clone().expect("checked by wait_for"),
            // The watch outlives its waiters; its poll's failure ends the wait instead.
            Err(_) => std::future::pending().await,
        }
    }
}

/// Waits until the volume is in `state` (with `attached` meaning attached to `instance`).
pub async fn volume_state<C: Cloud>(
    cloud: &C,
    id: &str,
    want: &'static str,
    instance: Option<&str>,
    limit: Duration,
) -> CloudResult<Volume> {
    let what = match want {
        "attached" => "Waiting for the volume to attach",
        "available" => "Waiting for the volume to become available",
        _ => "Waiting for the volume",
    };
    until(what, limit, || async {
        let Some(v) = cloud.describe_volume(id).await? else {
            return Ok(Poll::Pending("not visible yet".into()));
        };
        if want == "attached" {
            let att = v
                .attachments
                .iter()
                .find(|a| Some(a.instance.as_str()) == instance);
            return match att {
                Some(a) if a.state == "attached" => Ok(Poll::Ready(v)),
                Some(a) => Ok(Poll::Pending(a.state.clone())),
                None => Ok(Poll::Pending(v.state.clone())),
            };
        }
        if v.state == want {
            return Ok(Poll::Ready(v));
        }
        if v.state == "error" {
            return Err(CloudError::new(
                what,
                format!("the volume {id} is in the error state"),
            ));
        }
        Ok(Poll::Pending(v.state.clone()))
    })
    .await
}

/// Waits until the instance is gone (terminated), so that its volumes are free.
pub async fn instance_terminated<C: Cloud>(
    cloud: &C,
    id: &str,
    limit: Duration,
) -> CloudResult<()> {
    until(
        "Waiting for the helper instance to terminate",
        limit,
        || async {
            match cloud.describe_instance(id).await? {
                None => Ok(Poll::Ready(())),
                Some(i) if i.state == "terminated" => Ok(Poll::Ready(())),
                Some(i) => Ok(Poll::Pending(i.state)),
            }
        },
    )
    .await
}
