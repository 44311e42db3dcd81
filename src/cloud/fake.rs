//! Test doubles of the cloud: [`FakeCloud`], an in-memory EC2 whose state changes at once and
//! which logs every call, and [`Faulty`], a wrapper around any [`Cloud`] that fails chosen
//! calls (the n-th call of an action, or the next k). With them the ledger's unwind order
//! and the commands' cleanup paths are tested without root, ssh or the simulator.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::snapshot::{Snapshot, Snapshots};
use super::{
    Arch, Attachment, Cloud, CloudError, CloudResult, Instance, LaunchRequest, ResourceKind,
    RootDisk, Tagged, Tags, Volume,
};

#[derive(Default)]
struct State {
    next: u32,
    volumes: BTreeMap<String, Volume>,
    instances: BTreeMap<String, Instance>,
    groups: BTreeMap<String, BTreeMap<String, String>>,
    key_pairs: BTreeMap<String, BTreeMap<String, String>>,
    snapshots: BTreeMap<String, Snapshot>,
    /// Volumes whose attachment has DeleteOnTermination set.
    delete_on_termination: Vec<String>,
    calls: Vec<String>,
}

/// An in-memory EC2: one zone, instances running at once (at 127.0.0.1), volumes
/// attached and detached at once, terminations that take DeleteOnTermination volumes along.
#[derive(Clone, Default)]
pub struct FakeCloud {
    state: Arc<Mutex<State>>,
}

impl FakeCloud {
    fn with<T>(&self, call: String, f: impl FnOnce(&mut State) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.calls.push(call);
        f(&mut s)
    }

    fn id(s: &mut State, prefix: &str) -> String {
        s.next += 1;
        format!("{prefix}-{:08x}", s.next)
    }

    /// Every call made so far, as `Action id…`, in order.
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn volume(&self, id: &str) -> Option<Volume> {
        self.state.lock().unwrap().volumes.get(id).cloned()
    }

    pub fn volumes(&self) -> Vec<String> {
        self.state.lock().unwrap().volumes.keys().cloned().collect()
    }

    pub fn instance_states(&self) -> Vec<String> {
        let s = self.state.lock().unwrap();
        s.instances.values().map(|i| i.state.clone()).collect()
    }

    pub fn groups(&self) -> Vec<String> {
        self.state.lock().unwrap().groups.keys().cloned().collect()
    }

    pub fn key_pairs(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .key_pairs
            .keys()
            .cloned()
            .collect()
    }

    /// A volume that exists already (a user's).
    pub fn add_volume(&self, gib: i32) -> Volume {
        let mut s = self.state.lock().unwrap();
        let id = Self::id(&mut s, "vol");
        let v = Volume {
            id: id.clone(),
            state: "available".into(),
            size_gib: gib,
            zone: "fake-1a".into(),
            attachments: vec![],
            tags: BTreeMap::new(),
        };
        s.volumes.insert(id, v.clone());
        v
    }
}

fn missing(action: &'static str, code: &str, id: &str) -> CloudError {
    CloudError {
        action,
        code: Some(code.into()),
        message: format!("{id} does not exist"),
    }
}

impl Cloud for FakeCloud {
    async fn describe_volume(&self, id: &str) -> CloudResult<Option<Volume>> {
        self.with(format!("DescribeVolumes {id}"), |s| {
            Ok(s.volumes.get(id).cloned())
        })
    }

    async fn create_volume(&self, zone: &str, size_gib: i32, tags: &Tags) -> CloudResult<String> {
        self.with(format!("CreateVolume {size_gib}"), |s| {
            let id = Self::id(s, "vol");
            s.volumes.insert(
                id.clone(),
                Volume {
                    id: id.clone(),
                    state: "available".into(),
                    size_gib,
                    zone: zone.into(),
                    attachments: vec![],
                    tags: tags.iter().cloned().collect(),
                },
            );
            Ok(id)
        })
    }

    async fn delete_volume(&self, id: &str) -> CloudResult<()> {
        self.with(format!("DeleteVolume {id}"), |s| {
            match s.volumes.get(id).map(|v| v.attachments.is_empty()) {
                Some(false) => Err(CloudError {
                    action: "Deleting the volume",
                    code: Some("VolumeInUse".into()),
                    message: format!("{id} is attached"),
                }),
                _ => {
                    s.volumes.remove(id);
                    Ok(())
                }
            }
        })
    }

    async fn attach_volume(&self, volume: &str, instance: &str, device: &str) -> CloudResult<()> {
        self.with(format!("AttachVolume {volume} {instance}"), |s| {
            let v = s
                .volumes
                .get_mut(volume)
                .ok_or_else(|| missing("Attaching the volume", "InvalidVolume.NotFound", volume))?;
            v.state = "in-use".into();
            v.attachments = vec![Attachment {
                instance: instance.into(),
                device: device.into(),
                state: "attached".into(),
                delete_on_termination: false,
            }];
            Ok(())
        })
    }

    async fn detach_volume(&self, volume: &str, instance: &str) -> CloudResult<()> {
        self.with(format!("DetachVolume {volume} {instance}"), |s| {
            if let Some(v) = s.volumes.get_mut(volume) {
                v.state = "available".into();
                v.attachments.clear();
            }
            s.delete_on_termination.retain(|x| x != volume);
            Ok(())
        })
    }

    async fn set_delete_on_termination(
        &self,
        instance: &str,
        _device: &str,
        volume: &str,
        delete: bool,
    ) -> CloudResult<()> {
        self.with(
            format!("ModifyInstanceAttribute {instance} {volume} {delete}"),
            |s| {
                if let Some(a) = s
                    .volumes
                    .get_mut(volume)
                    .and_then(|v| v.attachments.first_mut())
                {
                    a.delete_on_termination = delete;
                }
                s.delete_on_termination.retain(|x| x != volume);
                if delete {
                    s.delete_on_termination.push(volume.into());
                }
                Ok(())
            },
        )
    }

    async fn create_tags(&self, id: &str, tags: &Tags) -> CloudResult<()> {
        self.with(format!("CreateTags {id}"), |s| {
            if let Some(v) = s.volumes.get_mut(id) {
                v.tags.extend(tags.iter().cloned());
            }
            if let Some(n) = s.snapshots.get_mut(id) {
                n.tags.extend(tags.iter().cloned());
            }
            Ok(())
        })
    }

    async fn run_instance(&self, request: &LaunchRequest) -> CloudResult<String> {
        self.with("RunInstances".into(), |s| {
            let id = Self::id(s, "i");
            s.instances.insert(
                id.clone(),
                Instance {
                    id: id.clone(),
                    state: "running".into(),
                    zone: request.zone.clone(),
                    address: Some("127.0.0.1".into()),
                    public_address: false,
                },
            );
            Ok(id)
        })
    }

    async fn describe_instance(&self, id: &str) -> CloudResult<Option<Instance>> {
        self.with(format!("DescribeInstances {id}"), |s| {
            Ok(s.instances.get(id).cloned())
        })
    }

    async fn terminate_instance(&self, id: &str) -> CloudResult<()> {
        self.with(format!("TerminateInstances {id}"), |s| {
            if let Some(i) = s.instances.get_mut(id) {
                i.state = "terminated".into();
            }
            let attached: Vec<String> = s
                .volumes
                .values()
                .filter(|v| v.attachments.iter().any(|a| a.instance == id))
                .map(|v| v.id.clone())
                .collect();
            for v in attached {
                if s.delete_on_termination.contains(&v) {
                    s.volumes.remove(&v);
                } else if let Some(vol) = s.volumes.get_mut(&v) {
                    vol.state = "available".into();
                    vol.attachments.clear();
                }
            }
            Ok(())
        })
    }

    async fn key_pair_tags(&self, name: &str) -> CloudResult<Option<BTreeMap<String, String>>> {
        self.with(format!("DescribeKeyPairs {name}"), |s| {
            Ok(s.key_pairs.get(name).cloned())
        })
    }

    async fn import_key_pair(&self, name: &str, _public_key: &str, tags: &Tags) -> CloudResult<()> {
        self.with(format!("ImportKeyPair {name}"), |s| {
            if s.key_pairs.contains_key(name) {
                return Err(CloudError {
                    action: "Importing the key pair",
                    code: Some("InvalidKeyPair.Duplicate".into()),
                    message: format!("{name} exists"),
                });
            }
            s.key_pairs
                .insert(name.into(), tags.iter().cloned().collect());
            Ok(())
        })
    }

    async fn current_image(&self, _arch: Arch) -> CloudResult<String> {
        self.with("GetParameter".into(), |_| Ok("ami-00000001".into()))
    }

    async fn image_info(&self, _image_id: &str) -> CloudResult<Option<(Arch, RootDisk)>> {
        self.with("DescribeImages".into(), |_| {
            Ok(Some((
                Arch::X86_64,
                RootDisk {
                    device: "/dev/xvda".into(),
                    size_gib: Some(8),
                },
            )))
        })
    }

    async fn missing_security_groups(&self, ids: &[String]) -> CloudResult<Vec<String>> {
        self.with("DescribeSecurityGroups".into(), |s| {
            Ok(ids
                .iter()
                .filter(|i| !s.groups.contains_key(*i))
                .cloned()
                .collect())
        })
    }

    async fn instance_arch(&self, _instance_type: &str) -> CloudResult<Arch> {
        self.with("DescribeInstanceTypes".into(), |_| Ok(Arch::X86_64))
    }

    async fn zones_for(&self, _instance_type: &str) -> CloudResult<Vec<String>> {
        self.with("DescribeInstanceTypeOfferings".into(), |_| {
            Ok(vec!["fake-1a".into()])
        })
    }

    async fn subnet_info(&self, subnet_id: &str) -> CloudResult<(String, String)> {
        self.with(format!("DescribeSubnets {subnet_id}"), |_| {
            Ok(("fake-1a".into(), "vpc-1".into()))
        })
    }

    async fn default_vpc(&self) -> CloudResult<Option<String>> {
        self.with("DescribeVpcs".into(), |_| Ok(Some("vpc-1".into())))
    }

    async fn find_group(&self, _vpc: &str, name: &str) -> CloudResult<Option<String>> {
        self.with(format!("DescribeSecurityGroups {name}"), |s| {
            Ok(s.groups
                .iter()
                .find(|(_, t)| t.get("Name").map(String::as_str) == Some(name))
                .map(|(id, _)| id.clone()))
        })
    }

    async fn create_group(&self, name: &str, _vpc: &str, tags: &Tags) -> CloudResult<String> {
        self.with(format!("CreateSecurityGroup {name}"), |s| {
            if s.groups
                .values()
                .any(|t| t.get("Name").map(String::as_str) == Some(name))
            {
                return Err(CloudError {
                    action: "Creating the helpers' security group",
                    code: Some("InvalidGroup.Duplicate".into()),
                    message: format!("{name} exists"),
                });
            }
            let id = Self::id(s, "sg");
            let mut t: BTreeMap<String, String> = tags.iter().cloned().collect();
            t.insert("Name".into(), name.into());
            s.groups.insert(id.clone(), t);
            Ok(id)
        })
    }

    async fn allow_ssh(&self, group: &str, cidr: &str) -> CloudResult<()> {
        self.with(
            format!("AuthorizeSecurityGroupIngress {group} {cidr}"),
            |_| Ok(()),
        )
    }

    async fn delete_security_group(&self, id: &str) -> CloudResult<()> {
        self.with(format!("DeleteSecurityGroup {id}"), |s| {
            let in_use = s.instances.values().any(|i| i.state != "terminated");
            if in_use {
                return Err(CloudError {
                    action: "Deleting the helper's security group",
                    code: Some("DependencyViolation".into()),
                    message: format!("{id} is in use"),
                });
            }
            s.groups.remove(id);
            Ok(())
        })
    }

    async fn tagged(&self, kind: ResourceKind, key: &str) -> CloudResult<Vec<Tagged>> {
        self.with(format!("Describe {kind:?} tagged {key}"), |s| {
            Ok(match kind {
                ResourceKind::Volume => s
                    .volumes
                    .values()
                    .filter(|v| v.tags.contains_key(key))
                    .map(|v| Tagged {
                        id: v.id.clone(),
                        state: v.state.clone(),
                        tags: v.tags.clone(),
                        launched: None,
                        size_gib: Some(v.size_gib),
                    })
                    .collect(),
                ResourceKind::SecurityGroup => s
                    .groups
                    .iter()
                    .filter(|(_, t)| t.contains_key(key))
                    .map(|(id, t)| Tagged {
                        id: id.clone(),
                        state: "available".into(),
                        tags: t.clone(),
                        launched: None,
                        size_gib: None,
                    })
                    .collect(),
                ResourceKind::Instance => Vec::new(),
            })
        })
    }
}

/// Snapshots complete at once; a volume made from one copies nothing (there is no data).
impl Snapshots for FakeCloud {
    async fn create_snapshot(
        &self,
        volume: &str,
        _description: &str,
        tags: &Tags,
    ) -> CloudResult<String> {
        self.with(format!("CreateSnapshot {volume}"), |s| {
            let size = s.volumes.get(volume).map(|v| v.size_gib);
            let id = Self::id(s, "snap");
            s.snapshots.insert(
                id.clone(),
                Snapshot {
                    id: id.clone(),
                    state: "completed".into(),
                    progress: Some("100%".into()),
                    volume_id: Some(volume.into()),
                    size_gib: size,
                    started: None,
                    message: None,
                    tags: tags.iter().cloned().collect(),
                },
            );
            Ok(id)
        })
    }

    async fn describe_snapshot(&self, id: &str) -> CloudResult<Option<Snapshot>> {
        self.with(format!("DescribeSnapshots {id}"), |s| {
            Ok(s.snapshots.get(id).cloned())
        })
    }

    async fn delete_snapshot(&self, id: &str) -> CloudResult<()> {
        self.with(format!("DeleteSnapshot {id}"), |s| {
            s.snapshots.remove(id);
            Ok(())
        })
    }

    async fn snapshots_tagged(&self, key: &str) -> CloudResult<Vec<Snapshot>> {
        self.with(format!("DescribeSnapshots tagged {key}"), |s| {
            Ok(s.snapshots
                .values()
                .filter(|n| n.tags.contains_key(key))
                .cloned()
                .collect())
        })
    }

    async fn create_volume_from(
        &self,
        zone: &str,
        snapshot: &str,
        size_gib: i32,
        tags: &Tags,
    ) -> CloudResult<String> {
        if !self.state.lock().unwrap().snapshots.contains_key(snapshot) {
            return Err(CloudError {
                action: "Creating a volume from the snapshot",
                code: Some("InvalidSnapshot.NotFound".into()),
                message: format!("The snapshot '{snapshot}' does not exist."),
            });
        }
        self.create_volume(zone, size_gib, tags).await
    }
}

impl FakeCloud {
    /// The snapshots that exist now.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.state
            .lock()
            .unwrap()
            .snapshots
            .values()
            .cloned()
            .collect()
    }
}

/// Fails chosen calls of the cloud it wraps: `fail(action, code, from, count)` makes the
/// calls number `from`, `from + 1`, … (`count` of them, counted from 1 per action) answer
/// `code` instead. Actions are named as [`FakeCloud::calls`] logs them (`AttachVolume`).
#[derive(Clone)]
pub struct Faulty<C> {
    inner: C,
    plan: Arc<Mutex<HashMap<&'static str, Plan>>>,
}

struct Plan {
    code: String,
    from: u32,
    count: u32,
    seen: u32,
}

impl<C: Cloud> Faulty<C> {
    pub fn new(inner: C) -> Self {
        Faulty {
            inner,
            plan: Default::default(),
        }
    }

    pub fn fail(&self, action: &'static str, code: &str, from: u32, count: u32) -> &Self {
        self.plan.lock().unwrap().insert(
            action,
            Plan {
                code: code.into(),
                from,
                count,
                seen: 0,
            },
        );
        self
    }

    fn check(&self, action: &'static str) -> CloudResult<()> {
        let mut plan = self.plan.lock().unwrap();
        let Some(p) = plan.get_mut(action) else {
            return Ok(());
        };
        p.seen += 1;
        if p.seen >= p.from && p.seen < p.from + p.count {
            return Err(CloudError {
                action,
                code: Some(p.code.clone()),
                message: format!("injected {} on call {}", p.code, p.seen),
            });
        }
        Ok(())
    }
}

/// Each method checks the plan, then asks the wrapped cloud.
macro_rules! faulty {
    ($tr:ident; $( $name:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty = $action:literal; )*) => {
        impl<C: $tr> $tr for Faulty<C> {
            $(
                async fn $name(&self, $($arg: $ty),*) -> CloudResult<$ret> {
                    self.check($action)?;
                    self.inner.$name($($arg),*).await
                }
            )*
        }
    };
}

faulty! { Cloud;
    describe_volume(id: &str) -> Option<Volume> = "DescribeVolumes";
    create_volume(zone: &str, size_gib: i32, tags: &Tags) -> String = "CreateVolume";
    delete_volume(id: &str) -> () = "DeleteVolume";
    attach_volume(volume: &str, instance: &str, device: &str) -> () = "AttachVolume";
    detach_volume(volume: &str, instance: &str) -> () = "DetachVolume";
    set_delete_on_termination(instance: &str, device: &str, volume: &str, delete: bool) -> () = "ModifyInstanceAttribute";
    create_tags(id: &str, tags: &Tags) -> () = "CreateTags";
    run_instance(request: &LaunchRequest) -> String = "RunInstances";
    describe_instance(id: &str) -> Option<Instance> = "DescribeInstances";
    terminate_instance(id: &str) -> () = "TerminateInstances";
    key_pair_tags(name: &str) -> Option<BTreeMap<String, String>> = "DescribeKeyPairs";
    import_key_pair(name: &str, public_key: &str, tags: &Tags) -> () = "ImportKeyPair";
    current_image(arch: Arch) -> String = "GetParameter";
    image_info(image_id: &str) -> Option<(Arch, RootDisk)> = "DescribeImages";
    missing_security_groups(ids: &[String]) -> Vec<String> = "DescribeSecurityGroups";
    instance_arch(instance_type: &str) -> Arch = "DescribeInstanceTypes";
    zones_for(instance_type: &str) -> Vec<String> = "DescribeInstanceTypeOfferings";
    subnet_info(subnet_id: &str) -> (String, String) = "DescribeSubnets";
    default_vpc() -> Option<String> = "DescribeVpcs";
    find_group(vpc: &str, name: &str) -> Option<String> = "DescribeSecurityGroups";
    create_group(name: &str, vpc: &str, tags: &Tags) -> String = "CreateSecurityGroup";
    allow_ssh(group: &str, cidr: &str) -> () = "AuthorizeSecurityGroupIngress";
    delete_security_group(id: &str) -> () = "DeleteSecurityGroup";
    tagged(kind: ResourceKind, key: &str) -> Vec<Tagged> = "Describe";
}

faulty! { Snapshots;
    create_snapshot(volume: &str, description: &str, tags: &Tags) -> String = "CreateSnapshot";
    describe_snapshot(id: &str) -> Option<Snapshot> = "DescribeSnapshots";
    delete_snapshot(id: &str) -> () = "DeleteSnapshot";
    snapshots_tagged(key: &str) -> Vec<Snapshot> = "DescribeSnapshots";
    create_volume_from(zone: &str, snapshot: &str, size_gib: i32, tags: &Tags) -> String = "CreateVolume";
}
