//! The cloud, behind a narrow trait: everything ec2-backup asks of EC2 and SSM. The real
//! implementation is [`aws::AwsCloud`]; tests can wrap it to inject failures.

pub mod aws;
pub mod caller;
pub mod wait;

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

/// What ec2-backup needs of EC2. Calls are made from one task, so the futures need not be Send.
#[allow(async_fn_in_trait)]
pub trait Cloud {
    async fn describe_volume(&self, id: &str) -> CloudResult<Option<Volume>>;
    async fn create_volume(&self, zone: &str, size_gib: i32, tags: &Tags) -> CloudResult<String>;
    async fn delete_volume(&self, id: &str) -> CloudResult<()>;
    async fn attach_volume(&self, volume: &str, instance: &str, device: &str) -> CloudResult<()>;
    async fn detach_volume(&self, volume: &str, instance: &str) -> CloudResult<()>;
    /// Whether terminating `instance` deletes the `volume` attached to it at `device`
    /// (ModifyInstanceAttribute; the flag is always sent explicitly: unset means true).
    async fn set_delete_on_termination(
        &self,
        instance: &str,
        device: &str,
        volume: &str,
        delete: bool,
    ) -> CloudResult<()>;
    async fn create_tags(&self, id: &str, tags: &Tags) -> CloudResult<()>;

    async fn run_instance(&self, request: &LaunchRequest) -> CloudResult<String>;
    async fn describe_instance(&self, id: &str) -> CloudResult<Option<Instance>>;
    async fn terminate_instance(&self, id: &str) -> CloudResult<()>;

    /// The key pair's tags, or None when it does not exist.
    async fn key_pair_tags(
        &self,
        name: &str,
    ) -> CloudResult<Option<std::collections::BTreeMap<String, String>>>;
    /// ImportKeyPair. A retry that answers `InvalidKeyPair.Duplicate` may be this very
    /// import: the caller tells by its tags.
    async fn import_key_pair(&self, name: &str, public_key: &str, tags: &Tags) -> CloudResult<()>;

    /// The current Amazon Linux image for this architecture in the client's region.
    async fn current_image(&self, arch: Arch) -> CloudResult<String>;
    /// An image's architecture and root disk; None when it does not exist.
    async fn image_info(&self, image_id: &str) -> CloudResult<Option<(Arch, RootDisk)>>;
    /// The IDs among `ids` that do not exist.
    async fn missing_security_groups(&self, ids: &[String]) -> CloudResult<Vec<String>>;
    async fn instance_arch(&self, instance_type: &str) -> CloudResult<Arch>;
    /// Zones (sorted) where this instance type can be launched.
    async fn zones_for(&self, instance_type: &str) -> CloudResult<Vec<String>>;
    /// The zone and VPC of a subnet.
    async fn subnet_info(&self, subnet_id: &str) -> CloudResult<(String, String)>;
    async fn default_vpc(&self) -> CloudResult<Option<String>>;

    /// Creates a security group that lets `cidr` reach tcp/22 and nothing else in.
    async fn create_ssh_group(
        &self,
        name: &str,
        vpc: &str,
        cidr: &str,
        tags: &Tags,
    ) -> CloudResult<String>;
    async fn delete_security_group(&self, id: &str) -> CloudResult<()>;

    /// Instances, volumes and security groups that carry the tag key `key`.
    async fn tagged(&self, kind: ResourceKind, key: &str) -> CloudResult<Vec<Tagged>>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    Instance,
    Volume,
    SecurityGroup,
}
