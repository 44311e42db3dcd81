//! The undo ledger: every resource a run makes is recorded the moment it exists, and unwound
//! in reverse when the run fails or is interrupted. A finished run takes out what it keeps
//! (its volume, the key pair) and unwinds the rest the same way, so there is one teardown.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cloud::snapshot::Snapshots;
use crate::cloud::{wait, Cloud, CloudError, CloudResult};
use crate::helper::ssh::Session;
use crate::report::Reporter;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    Instance(String),
    /// A volume this run created (deleted on failure). A user's volume is never recorded.
    Volume(String),
    Attachment {
        volume: String,
        instance: String,
    },
    /// The helper's temporary security group (deletable once the helper is gone).
    SecurityGroup(String),
    /// The volume's filesystem is mounted on the helper at this point.
    Mount(String),
    /// A snapshot this run started and has not kept yet (deleted on failure; EC2 accepts
    /// that while it is pending and removes it once it completes).
    Snapshot(String),
}

impl Resource {
    /// The resource as a user reads it: "the helper instance i-…".
    pub fn describe(&self) -> String {
        match self {
            Resource::Instance(id) => format!("the helper instance {id}"),
            Resource::Volume(id) => format!("the volume {id}"),
            Resource::Attachment { volume, instance } => {
                format!("the attachment of {volume} to {instance}")
            }
            Resource::Mount(point) => format!("the mount at {point} on the helper"),
            Resource::SecurityGroup(id) => format!("the security group {id}"),
            Resource::Snapshot(id) => format!("the snapshot {id}"),
        }
    }
}

/// How long an unmount during cleanup may take (dirty data is written out first).
const UNMOUNT_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
pub struct Ledger {
    items: Mutex<Vec<Resource>>,
    /// Create calls under way, whose results are not recorded yet.
    in_flight: AtomicUsize,
}

impl Ledger {
    /// Makes a create call that runs to its end even if the run is interrupted meanwhile
    /// (the call is a task of its own, not part of the run's future), and records what it
    /// made the moment EC2 answers. Cleanup waits for such calls with [`Ledger::settle`], so an
    /// interrupt can never lose track of something EC2 made.
    pub async fn create<T, F, R>(self: &Arc<Self>, call: F, resource: R) -> CloudResult<T>
    where
        F: Future<Output = CloudResult<T>> + Send + 'static,
        T: Send + 'static,
        R: FnOnce(&T) -> Resource + Send + 'static,
    {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let ledger = Arc::clone(self);
        let task = tokio::spawn(async move {
            let result = call.await;
            if let Ok(made) = &result {
                ledger.record(resource(made));
            }
            ledger.in_flight.fetch_sub(1, Ordering::SeqCst);
            result
        });
        task.await
            .unwrap_or_else(|e| Err(CloudError::new("A cloud call", e.to_string())))
    }

    /// Waits (up to `limit`) until no create call is under way.
    pub async fn settle(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        while self.in_flight.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn record(&self, r: Resource) {
        self.lock().push(r);
    }

    /// Takes a resource out: it was released normally, or it is kept.
    pub fn forget(&self, r: &Resource) {
        self.lock().retain(|x| x != r);
    }

    pub fn snapshot(&self) -> Vec<Resource> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Resource>> {
        // A panic elsewhere must not stop the cleanup: the list itself is always whole.
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Unwinds everything recorded, newest first, and returns what could not be removed
    /// (as sentences naming the resource). Every step is attempted whatever failed before.
    pub async fn unwind<C: Snapshots>(
        &self,
        cloud: &C,
        ssh: Option<&Session>,
        report: &Reporter,
    ) -> Vec<String> {
        let mut left = Vec::new();
        // Newest first, but in dependency order whatever the order of creation: a volume
        // can only be deleted, and a group only removed, once the helper no longer holds it.
        let mut items: Vec<Resource> = self.snapshot().into_iter().rev().collect();
        items.sort_by_key(|r| match r {
            Resource::Mount(_) => 0,
            Resource::Attachment { .. } => 1,
            Resource::Instance(_) => 2,
            Resource::Snapshot(_) => 3,
            Resource::Volume(_) => 4,
            Resource::SecurityGroup(_) => 5,
        });
        // A security group can only go once the instance is gone, and a volume still attached
        // (its detach failed) once termination has let go of it: only then is termination
        // awaited (on EC2 it takes tens of seconds).
        let groups = items
            .iter()
            .any(|r| matches!(r, Resource::SecurityGroup(_)));
        let volumes: Vec<String> = items
            .iter()
            .filter_map(|r| match r {
                Resource::Volume(v) => Some(v.clone()),
                _ => None,
            })
            .collect();
        for item in items {
            match &item {
                Resource::Mount(point) => {
                    if let Some(ssh) = ssh {
                        report.step("unmounting the volume on the helper");
                        let words = ["sudo", "-n", "umount", "--", point.as_str()];
                        let done = ssh.run_for("Unmounting", &words, UNMOUNT_LIMIT).await;
                        if done.is_err() {
                            report.step(
                                "could not unmount cleanly; terminating the helper detaches it",
                            );
                        }
                    }
                }
                Resource::Attachment { volume, instance } => {
                    report.step(&format!("detaching {volume} from {instance}"));
                    let detached = match cloud.detach_volume(volume, instance).await {
                        Ok(()) => wait::volume_state(
                            cloud,
                            volume,
                            "available",
                            None,
                            Duration::from_secs(120),
                        )
                        .await
                        .map(|_| ()),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = detached {
                        report.step(&format!("{e}; terminating the helper detaches it"));
                    }
                }
                Resource::Instance(id) => {
                    report.step(&format!("terminating the helper instance {id}"));
                    if let Err(e) = cloud.terminate_instance(id).await {
                        left.push(format!("the helper instance {id} is still running ({e})"));
                        continue;
                    }
                    if groups || still_attached(cloud, &volumes).await {
                        if let Err(e) =
                            wait::instance_terminated(cloud, id, Duration::from_secs(300)).await
                        {
                            report.step(&e.to_string());
                        }
                    }
                }
                Resource::Volume(id) => {
                    report.step(&format!("deleting the volume {id} this run created"));
                    // Marked DeleteOnTermination while attached, it may be gone already.
                    if matches!(cloud.describe_volume(id).await, Ok(None)) {
                        self.forget(&item);
                        continue;
                    }
                    let deleted = match wait::volume_state(
                        cloud,
                        id,
                        "available",
                        None,
                        Duration::from_secs(300),
                    )
                    .await
                    {
                        Ok(_) => cloud.delete_volume(id).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = deleted {
                        left.push(format!("the volume {id} could not be deleted ({e})"));
                        continue;
                    }
                }
                Resource::Snapshot(id) => {
                    report.step(&format!("deleting the snapshot {id} this run started"));
                    if let Err(e) = crate::history::snapshot::discard(cloud, id).await {
                        left.push(format!("the snapshot {id} could not be deleted ({e})"));
                        continue;
                    }
                }
                Resource::SecurityGroup(id) => {
                    report.step(&format!("deleting the security group {id}"));
                    if let Err(e) = delete_group(cloud, id).await {
                        left.push(format!(
                            "the security group {id} could not be deleted ({e})"
                        ));
                        continue;
                    }
                }
            }
            self.forget(&item);
        }
        left
    }
}

/// Whether any of `volumes` is still attached to something (or cannot be told).
async fn still_attached<C: Cloud>(cloud: &C, volumes: &[String]) -> bool {
    for v in volumes {
        match cloud.describe_volume(v).await {
            Ok(Some(vol)) if vol.attachments.is_empty() => {}
            Ok(None) => {}
            _ => return true,
        }
    }
    false
}

/// Deletes a security group, waiting while EC2 still counts the terminated helper's network
/// interface as a user of it (DependencyViolation lasts a little after termination).
pub(crate) async fn delete_group<C: Cloud>(
    cloud: &C,
    id: &str,
) -> Result<(), crate::cloud::CloudError> {
    wait::until(
        "Deleting the security group",
        Duration::from_secs(180),
        || async {
            match cloud.delete_security_group(id).await {
                Ok(()) => Ok(wait::Poll::Ready(())),
                Err(e) if e.code.as_deref() == Some("DependencyViolation") => {
                    Ok(wait::Poll::Pending("still in use".into()))
                }
                Err(e) => Err(e),
            }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::fake::{FakeCloud, Faulty};
    use crate::cloud::{Cloud, LaunchRequest};

    /// A helper with a volume of its own attached and its security group, all recorded in
    /// the order a run makes them.
    async fn helper_with_volume(fake: &FakeCloud) -> (Ledger, String, String, String) {
        let sg = fake.create_group("g", "vpc-1", &vec![]).await.unwrap();
        let i = fake.run_instance(&LaunchRequest::default()).await.unwrap();
        let v = fake.create_volume("fake-1a", 1, &vec![]).await.unwrap();
        fake.attach_volume(&v, &i, "/dev/sdf").await.unwrap();
        let l = Ledger::default();
        l.record(Resource::SecurityGroup(sg.clone()));
        l.record(Resource::Instance(i.clone()));
        l.record(Resource::Volume(v.clone()));
        l.record(Resource::Attachment {
            volume: v.clone(),
            instance: i.clone(),
        });
        (l, sg, i, v)
    }

    fn position(calls: &[String], prefix: &str) -> usize {
        calls
            .iter()
            .position(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {calls:?}"))
    }

    #[tokio::test]
    async fn unwinds_in_dependency_order_whatever_the_order_of_creation() {
        let fake = FakeCloud::default();
        let (ledger, sg, _, v) = helper_with_volume(&fake).await;
        let left = ledger.unwind(&fake, None, &Reporter::new(false)).await;
        assert!(left.is_empty(), "{left:?}");
        let calls = fake.calls();
        let detach = position(&calls, "DetachVolume");
        let terminate = position(&calls, "TerminateInstances");
        let delete_volume = position(&calls, &format!("DeleteVolume {v}"));
        let delete_group = position(&calls, &format!("DeleteSecurityGroup {sg}"));
        assert!(
            detach < terminate && terminate < delete_volume && delete_volume < delete_group,
            "{calls:?}"
        );
        assert!(fake.volumes().is_empty() && fake.groups().is_empty());
        assert_eq!(fake.instance_states(), ["terminated"]);
        assert!(ledger.snapshot().is_empty());
    }

    #[tokio::test]
    async fn every_step_is_tried_and_what_is_left_is_named() {
        let fake = FakeCloud::default();
        let (ledger, _, _, v) = helper_with_volume(&fake).await;
        let faulty = Faulty::new(fake.clone());
        // The detach fails (termination detaches it instead); deleting the volume fails.
        faulty
            .fail("DetachVolume", "UnauthorizedOperation", 1, 1)
            .fail("DeleteVolume", "UnauthorizedOperation", 1, 1);
        let left = ledger.unwind(&faulty, None, &Reporter::new(false)).await;
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(
            left[0].contains(&v) && left[0].contains("could not be deleted"),
            "{left:?}"
        );
        assert_eq!(fake.instance_states(), ["terminated"]);
        assert!(fake.groups().is_empty(), "the group went even so");
        assert_eq!(ledger.snapshot(), vec![Resource::Volume(v)]);
    }

    #[tokio::test]
    async fn a_volume_its_helper_took_along_is_done() {
        let fake = FakeCloud::default();
        let i = fake.run_instance(&LaunchRequest::default()).await.unwrap();
        let v = fake.create_volume("fake-1a", 1, &vec![]).await.unwrap();
        fake.attach_volume(&v, &i, "/dev/sdf").await.unwrap();
        fake.set_delete_on_termination(&i, "/dev/sdf", &v, true)
            .await
            .unwrap();
        let ledger = Ledger::default();
        ledger.record(Resource::Instance(i));
        ledger.record(Resource::Volume(v.clone()));
        let started = std::time::Instant::now();
        let left = ledger.unwind(&fake, None, &Reporter::new(false)).await;
        assert!(left.is_empty(), "{left:?}");
        assert!(fake.volume(&v).is_none());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "waited for a volume that is gone"
        );
    }

    #[test]
    fn forget_removes_only_that_resource() {
        let l = Ledger::default();
        l.record(Resource::Instance("i-1".into()));
        l.record(Resource::Volume("vol-1".into()));
        l.record(Resource::Mount("/mnt".into()));
        l.forget(&Resource::Volume("vol-1".into()));
        assert_eq!(
            l.snapshot(),
            vec![
                Resource::Instance("i-1".into()),
                Resource::Mount("/mnt".into())
            ]
        );
    }
}
