//! Waiting for cloud state: poll with short, slowly growing intervals under one deadline.
//! No fixed sleeps: a state that is reached quickly is noticed quickly.

use std::future::Future;
use std::time::{Duration, Instant};

use super::{Cloud, CloudError, CloudResult, Instance, Volume};

/// What one poll says.
pub enum Poll<T> {
    Ready(T),
    Pending(String),
}

/// Polls `check` until it is ready, it fails, or `limit` passes (then the error says what was
/// awaited and the last state seen).
pub async fn until<T, F, Fut>(what: &'static str, limit: Duration, mut check: F) -> CloudResult<T>
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
        tokio::time::sleep(interval).await;
        // Tight at first (the simulator and a fast EC2 answer within a second), then capped
        // low: a state reached is noticed within half a second. About ten Describe calls in
        // the first two seconds, two a second after: far below EC2's request rate limits.
        interval = (interval * 4 / 3).min(Duration::from_millis(500));
    }
}

pub async fn instance_running<C: Cloud>(
    cloud: &C,
    id: &str,
    limit: Duration,
) -> CloudResult<Instance> {
    instance_until(
        cloud,
        id,
        "Waiting for the helper instance to start",
        limit,
        |i| (i.state == "running" && i.address.is_some()).then(|| i.clone()),
    )
    .await
}

/// Waits until the helper has the address it will keep: as soon as a public one is known,
/// which is often while the instance is still pending (ssh can then be tried while it
/// boots), or else once it is running. Returns that address.
pub async fn instance_address<C: Cloud>(
    cloud: &C,
    id: &str,
    limit: Duration,
) -> CloudResult<String> {
    instance_until(
        cloud,
        id,
        "Waiting for the helper instance's address",
        limit,
        |i| {
            let kept = i.state == "running" || (i.state == "pending" && i.public_address);
            i.address.clone().filter(|_| kept)
        },
    )
    .await
}

/// Polls a starting instance until `ready` gives a value; an instance that is neither
/// pending nor running (it will never start) is an error.
async fn instance_until<C: Cloud, T>(
    cloud: &C,
    id: &str,
    what: &'static str,
    limit: Duration,
    ready: impl Fn(&Instance) -> Option<T>,
) -> CloudResult<T> {
    until(what, limit, || async {
        match cloud.describe_instance(id).await? {
            Some(i) => match ready(&i) {
                Some(v) => Ok(Poll::Ready(v)),
                None if matches!(i.state.as_str(), "pending" | "running") => {
                    Ok(Poll::Pending(i.state))
                }
                None => Err(CloudError::new(
                    "Waiting for the helper instance to start",
                    format!("the instance {id} is {} instead of running", i.state),
                )),
            },
            None => Ok(Poll::Pending("not visible yet".into())),
        }
    })
    .await
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
