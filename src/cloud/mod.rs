//! The cloud, behind a narrow trait: everything ec2-backup asks of EC2 and SSM. The real
//! implementation is [`aws::AwsCloud`]; tests can wrap it to inject failures.

pub mod aws;
pub mod caller;
pub mod ebs;
#[cfg(test)]
pub mod fake;
pub mod snapshot;
pub mod wait;

use std::future::Future;

use thiserror::Error;

/// A failed cloud call, with the action and EC2's own error code when there is one.
#[derive(Debug, Error, Clone)]
#[error("{action} failed: {message}")]
pub struct CloudError {
    pub action: &'static str,
    pub code: Option<String>,
    pub message: String,
}

/// The code of errors that are the user's input or configuration, not the cloud's fault.
pub const CONFIG: &str = "ec2-backup.Config";

impl CloudError {
    /// Whether this error says the user's input is wrong (a name that does not exist, a
    /// malformed ID, a value EC2 refuses), rather than that the cloud failed.
    pub fn is_bad_input(&self) -> bool {
        const CODES: &[&str] = &[
            CONFIG,
            "InvalidParameterValue",
            "InvalidInstanceType",
            "InvalidSubnetID",
            "InvalidAMIID",
            "InvalidGroup",
            "InvalidGroupId",
            "InvalidKeyPair",
            "InvalidVolumeID",
            "InvalidVpcID",
            "ParameterNotFound",
        ];
        self.code
            .as_deref()
            .is_some_and(|c| CODES.iter().any(|p| c.starts_with(p)))
    }

    /// A configuration error of the user's (exit 2).
    pub fn config(action: &'static str, message: impl Into<String>) -> Self {
        CloudError {
            action,
            code: Some(CONFIG.to_string()),
            message: message.into(),
        }
    }

    pub fn new(action: &'static str, message: impl Into<String>) -> Self {
        CloudError {
            action,
            code: None,
            message: message.into(),
        }
    }
}

pub type CloudResult<T> = Result<T, CloudError>;

/// `vol-` and 8 or 17 lowercase hex digits, as EC2 makes them.
pub fn valid_volume_id(id: &str) -> bool {
    id.strip_prefix("vol-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

#[cfg(test)]
#[test]
fn volume_ids() {
    assert!(valid_volume_id("vol-0123456789abcdef0"));
    assert!(valid_volume_id("vol-1a2b3c4d"));
    assert!(!valid_volume_id("vol-0123456789ABCDEF0"));
    assert!(!valid_volume_id("vol-123"));
    assert!(!valid_volume_id("i-0123456789abcdef0"));
    assert!(!valid_volume_id("vol-0123456789abcdefg"));
}

/// A tag as a key/value pair; every resource a run creates carries the run's tags.
pub type Tags = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub instance: String,
    pub device: String,
    pub state: String,
    /// Whether terminating the instance deletes the volume.
    pub delete_on_termination: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub id: String,
    pub state: String,
    pub size_gib: i32,
    pub zone: String,
    pub attachments: Vec<Attachment>,
    pub tags: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub state: String,
    pub zone: String,
    /// The address to reach it by: the public one if it has one, else the private one.
    pub address: Option<String>,
    /// Whether `address` is the public one. A pending instance may get its public address
    /// a moment after its private one; a running instance has all it will have.
    pub public_address: bool,
}

/// An image's root disk: its device name and (when the image says) its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootDisk {
    pub device: String,
    pub size_gib: Option<i32>,
}

#[derive(Debug, Clone, Default)]
pub struct LaunchRequest {
    pub image_id: String,
    /// The image's root disk, given as an encrypted gp3 volume.
    pub root_disk: Option<RootDisk>,
    pub instance_type: String,
    pub key_name: String,
    pub zone: String,
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
    pub iam_instance_profile: Option<String>,
    /// Cloud-config text (the SDK call encodes it).
    pub user_data: String,
    pub tags: Tags,
}

/// A resource found by its tags (for `gc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tagged {
    pub id: String,
    pub state: String,
    pub tags: std::collections::BTreeMap<String, String>,
    /// When an instance was launched (RFC 3339); None for other resources.
    pub launched: Option<String>,
    /// A volume's size; None for other resources.
    pub size_gib: Option<i32>,
}

/// CPU architecture of an instance type, as EC2 and the Amazon Linux parameters spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Arm64,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }
}

/// What ec2-backup needs of EC2: the real SDK client ([`aws::AwsCloud`]), an in-memory fake
/// and the test doubles in `fake` (an in-memory EC2, and a wrapper failing chosen calls) implement
/// it. Futures are Send: create calls run as tasks of their own (see [`crate::ledger`]).
pub trait Cloud: Clone + Send + Sync + 'static {
    fn describe_volume(&self, id: &str)
        -> impl Future<Output = CloudResult<Option<Volume>>> + Send;
    fn create_volume(
        &self,
        zone: &str,
        size_gib: i32,
        tags: &Tags,
    ) -> impl Future<Output = CloudResult<String>> + Send;
    fn delete_volume(&self, id: &str) -> impl Future<Output = CloudResult<()>> + Send;
    fn attach_volume(
        &self,
        volume: &str,
        instance: &str,
        device: &str,
    ) -> impl Future<Output = CloudResult<()>> + Send;
    fn detach_volume(
        &self,
        volume: &str,
        instance: &str,
    ) -> impl Future<Output = CloudResult<()>> + Send;
    /// Whether terminating `instance` deletes the `volume` attached to it at `device`
    /// (ModifyInstanceAttribute; the flag is always sent explicitly: unset means true).
    fn set_delete_on_termination(
        &self,
        instance: &str,
        device: &str,
        volume: &str,
        delete: bool,
    ) -> impl Future<Output = CloudResult<()>> + Send;
    fn create_tags(&self, id: &str, tags: &Tags) -> impl Future<Output = CloudResult<()>> + Send;

    fn run_instance(
        &self,
        request: &LaunchRequest,
    ) -> impl Future<Output = CloudResult<String>> + Send;
    fn describe_instance(
        &self,
        id: &str,
    ) -> impl Future<Output = CloudResult<Option<Instance>>> + Send;
    fn terminate_instance(&self, id: &str) -> impl Future<Output = CloudResult<()>> + Send;

    /// The key pair's tags, or None when it does not exist.
    fn key_pair_tags(
        &self,
        name: &str,
    ) -> impl Future<Output = CloudResult<Option<std::collections::BTreeMap<String, String>>>> + Send;
    /// ImportKeyPair. A retry that answers `InvalidKeyPair.Duplicate` may be this very
    /// import: the caller tells by its tags.
    fn import_key_pair(
        &self,
        name: &str,
        public_key: &str,
        tags: &Tags,
    ) -> impl Future<Output = CloudResult<()>> + Send;

    /// The current Amazon Linux image for this architecture in the client's region.
    fn current_image(&self, arch: Arch) -> impl Future<Output = CloudResult<String>> + Send;
    /// An image's architecture and root disk; None when it does not exist.
    fn image_info(
        &self,
        image_id: &str,
    ) -> impl Future<Output = CloudResult<Option<(Arch, RootDisk)>>> + Send;
    /// The IDs among `ids` that do not exist.
    fn missing_security_groups(
        &self,
        ids: &[String],
    ) -> impl Future<Output = CloudResult<Vec<String>>> + Send;
    fn instance_arch(&self, instance_type: &str) -> impl Future<Output = CloudResult<Arch>> + Send;
    /// Zones (sorted) where this instance type can be launched.
    fn zones_for(
        &self,
        instance_type: &str,
    ) -> impl Future<Output = CloudResult<Vec<String>>> + Send;
    /// The zone and VPC of a subnet.
    fn subnet_info(
        &self,
        subnet_id: &str,
    ) -> impl Future<Output = CloudResult<(String, String)>> + Send;
    fn default_vpc(&self) -> impl Future<Output = CloudResult<Option<String>>> + Send;

    /// The security group named `name` in `vpc`, if there is one.
    fn find_group(
        &self,
        vpc: &str,
        name: &str,
    ) -> impl Future<Output = CloudResult<Option<String>>> + Send;
    /// Creates an empty security group (no ingress). A group of that name in that VPC
    /// already: `InvalidGroup.Duplicate`.
    fn create_group(
        &self,
        name: &str,
        vpc: &str,
        tags: &Tags,
    ) -> impl Future<Output = CloudResult<String>> + Send;
    /// Lets `cidr` reach tcp/22 through `group`; a rule that is there already is fine.
    fn allow_ssh(&self, group: &str, cidr: &str) -> impl Future<Output = CloudResult<()>> + Send;
    fn delete_security_group(&self, id: &str) -> impl Future<Output = CloudResult<()>> + Send;

    /// Instances, volumes and security groups that carry the tag key `key`.
    fn tagged(
        &self,
        kind: ResourceKind,
        key: &str,
    ) -> impl Future<Output = CloudResult<Vec<Tagged>>> + Send;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    Instance,
    Volume,
    SecurityGroup,
}
