//! Deciding a helper before anything is created: the launch and ssh options from the
//! environment, and the cloud lookups that can still refuse (instance type, image, zone,
//! network, key pair). Every command that leases a helper decides it here; bad input fails
//! with nothing made.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use crate::cloud::{caller, Arch, Cloud, CloudError, RootDisk};
use crate::error::Error;
use crate::flags::{LaunchFlags, SshFlags};
use crate::helper::keys::{self, KeyPlan, DEFAULT_KEY_NAME};
use crate::report::Reporter;

/// The default helper: small, cheap, current, Nitro, x86_64.
pub const DEFAULT_INSTANCE_TYPE: &str = "t3.micro";

/// How long a helper outlives its last heartbeat (EC2_BACKUP_WATCHDOG_SECONDS): long enough
/// for a slow boot and a congested link, short enough that a dead run costs minutes.
pub const DEFAULT_WATCHDOG: Duration = Duration::from_secs(300);

/// How every command's helper is launched and reached, from the environment.
#[derive(Debug, Clone)]
pub struct HelperOptions {
    pub launch: LaunchFlags,
    pub ssh: SshFlags,
    pub home: PathBuf,
    pub verbose: bool,
    /// How long the helper may take to accept ssh after it is running.
    pub boot_timeout: Duration,
    /// How long the helper outlives its last heartbeat from this run.
    pub watchdog: Duration,
}

impl HelperOptions {
    /// Reads `HOME`, `EC2_BACKUP_FLAGS_AWS`, `EC2_BACKUP_FLAGS_SSH`, `EC2_BACKUP_VERBOSE`,
    /// `EC2_BACKUP_BOOT_TIMEOUT` and `EC2_BACKUP_WATCHDOG_SECONDS`.
    pub fn from_env() -> Result<Self, Error> {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .ok_or_else(|| Error::Usage("HOME is not set, so ~/.ssh cannot be found".into()))?;
        let env = |name: &str| std::env::var(name).unwrap_or_default();
        let launch = LaunchFlags::parse(&env("EC2_BACKUP_FLAGS_AWS"))?;
        let ssh = SshFlags::parse(&env("EC2_BACKUP_FLAGS_SSH"), &home)?;
        // rsync carries these words in its -e option, which cannot hold both kinds of quote.
        for word in &ssh.words {
            crate::quote::rsh_word(word)
                .map_err(|e| Error::Usage(format!("EC2_BACKUP_FLAGS_SSH: {e}")))?;
        }
        let seconds = |name: &str, least: u64, default: Duration| match std::env::var(name) {
            Ok(s) => match s.trim().parse::<u64>() {
                Ok(n) if n >= least => Ok(Duration::from_secs(n)),
                _ if least == 0 => Err(Error::Usage(format!(
                    "{name} must be a whole number of seconds, not '{s}'"
                ))),
                _ => Err(Error::Usage(format!(
                    "{name} must be a whole number of seconds, at least {least}, not '{s}'"
                ))),
            },
            Err(_) => Ok(default),
        };
        Ok(HelperOptions {
            launch,
            ssh,
            home,
            verbose: crate::report::verbose_from_env(),
            boot_timeout: seconds("EC2_BACKUP_BOOT_TIMEOUT", 0, Duration::from_secs(300))?,
            watchdog: seconds("EC2_BACKUP_WATCHDOG_SECONDS", 5, DEFAULT_WATCHDOG)?,
        })
    }

    /// The public keys of the identities the ssh flags name (given to the helper at launch,
    /// so that an identity AWS knows nothing about still logs in). Checked before any cloud
    /// call.
    pub fn extra_authorized_keys(&self, report: &Reporter) -> Result<Vec<String>, Error> {
        let mut extra = Vec::new();
        for identity in self.ssh.identities() {
            if !identity.is_file() {
                return Err(Error::Usage(format!(
                    "EC2_BACKUP_FLAGS_SSH names the identity {}, which does not exist",
                    identity.display()
                )));
            }
            match keys::public_half(&identity) {
                Ok(k) => extra.push(k),
                Err(e) => report.warn(&format!("{e}; the helper will not know this identity")),
            }
        }
        Ok(extra)
    }
}

/// The decided helper: nothing of it exists yet.
#[derive(Debug, Clone)]
pub struct HelperPlan {
    pub zone: String,
    pub instance_type: String,
    pub arch: Arch,
    pub image_id: String,
    /// The image's root disk (given an encrypted volume at launch).
    pub root_disk: Option<RootDisk>,
    pub region: String,
    pub key_name: String,
    pub key: KeyPlan,
    /// The security group to make for the helper, unless the user named their own.
    pub ssh_group: Option<SshGroup>,
    /// Public keys of identities named in EC2_BACKUP_FLAGS_SSH, given to the helper.
    pub extra_authorized_keys: Vec<String>,
}

/// The helpers' shared security group in this VPC, to admit ssh from this machine only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshGroup {
    pub vpc: String,
    /// The CIDR the user named (`EC2_BACKUP_SSH_CIDR`); else the address the helper will see,
    /// found once its address is known ([`crate::cloud::caller::source_cidr`]).
    pub cidr: Option<String>,
}

/// A zone the helper must run in: that of a volume it will attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    pub zone: String,
    /// The volume, for messages.
    pub volume_id: String,
}

/// The cloud lookups that decide the helper, all at once. `pinned` resolves (concurrently
/// with them) to the zone of the volume the helper will attach, if there is one.
pub async fn decide<C: Cloud>(
    cloud: &C,
    region: &str,
    options: &HelperOptions,
    extra_authorized_keys: Vec<String>,
    pinned: impl Future<Output = Result<Option<Pinned>, Error>>,
    report: &Reporter,
) -> Result<HelperPlan, Error> {
    let instance_type = options
        .launch
        .instance_type
        .clone()
        .unwrap_or_else(|| DEFAULT_INSTANCE_TYPE.to_string());
    let key_name = options
        .launch
        .key_name
        .clone()
        .unwrap_or_else(|| DEFAULT_KEY_NAME.to_string());
    let subnet_lookup = async {
        match &options.launch.subnet_id {
            Some(s) => cloud.subnet_info(s).await.map(Some),
            None => Ok(None),
        }
    };
    // Without the user's own security groups, the run makes one that admits ssh from this
    // machine only; it needs the VPC (the subnet's, or the default one) and our address.
    let make_group = options.launch.security_group_ids.is_empty();
    let network = async {
        if !make_group {
            let missing = cloud
                .missing_security_groups(&options.launch.security_group_ids)
                .await?;
            if !missing.is_empty() {
                return Err(CloudError::config(
                    "Checking EC2_BACKUP_FLAGS_AWS",
                    format!("the security groups {} do not exist", missing.join(", ")),
                ));
            }
            return Ok((false, None, None));
        }
        let vpc = match &options.launch.subnet_id {
            Some(_) => None,
            None => cloud.default_vpc().await?,
        };
        Ok::<_, CloudError>((true, vpc, caller::configured_cidr()?))
    };
    let arch_and_image = async {
        let arch = cloud.instance_arch(&instance_type).await?;
        let image = match &options.launch.image_id {
            Some(i) => i.clone(),
            None => cloud.current_image(arch).await?,
        };
        let action = "Checking the helper's image";
        let Some((image_arch, root)) = cloud.image_info(&image).await? else {
            return Err(CloudError::config(
                action,
                format!("the image {image} does not exist in {region}"),
            ));
        };
        if image_arch != arch {
            return Err(CloudError::config(
                action,
                format!(
                    "the image {image} is {} but the instance type {instance_type} is {}",
                    image_arch.as_str(),
                    arch.as_str()
                ),
            ));
        }
        Ok::<(Arch, String, RootDisk), CloudError>((arch, image, root))
    };
    let (pinned, subnet, network, arch_image, zones, key_exists) = tokio::join!(
        pinned,
        subnet_lookup,
        network,
        arch_and_image,
        cloud.zones_for(&instance_type),
        cloud.key_pair_tags(&key_name),
    );
    let pinned = pinned?;
    let (arch, image_id, root_disk) = arch_image.map_err(input)?;
    let zones = zones.map_err(input)?;
    let subnet = subnet.map_err(input)?;
    let (make_group, default_vpc, cidr) = network.map_err(input)?;
    let vpc = subnet.as_ref().map(|(_, vpc)| vpc.clone()).or(default_vpc);
    let ssh_group = match (make_group, vpc) {
        (false, _) => None,
        (true, Some(vpc)) => Some(SshGroup { vpc, cidr }),
        (true, None) => {
            return Err(Error::Invalid(format!(
                "there is no default VPC in {region}; name a subnet and a security group that admits ssh with EC2_BACKUP_FLAGS_AWS=\"--subnet-id ID --security-group-ids ID\""
            )))
        }
    };
    let zone = match (subnet.map(|(zone, _)| zone), &pinned) {
        (Some(sz), Some(p)) if sz != p.zone => {
            return Err(Error::Invalid(format!(
                "the subnet is in {sz} but the volume {} is in {}; choose a subnet in {}",
                p.volume_id, p.zone, p.zone
            )))
        }
        (Some(sz), _) => sz,
        (None, Some(p)) => p.zone.clone(),
        (None, None) => zones.first().cloned().ok_or_else(|| {
            Error::Invalid(format!(
                "the instance type {instance_type} is not offered in any zone of {region}"
            ))
        })?,
    };
    if !zones.is_empty() && !zones.contains(&zone) {
        return Err(Error::Invalid(format!(
            "the instance type {instance_type} is not offered in {zone}; choose another with EC2_BACKUP_FLAGS_AWS=\"--instance-type TYPE\""
        )));
    }
    let key = keys::plan(
        &key_name,
        options.launch.key_name.is_some(),
        key_exists.map_err(input)?.is_some(),
        &options.home,
        region,
    )?;
    report.step(&format!(
        "helper: {instance_type} ({}) from {image_id} in {zone}, key pair {key_name}",
        arch.as_str()
    ));
    Ok(HelperPlan {
        zone,
        instance_type,
        arch,
        image_id,
        root_disk: Some(root_disk),
        region: region.to_string(),
        key_name,
        key,
        ssh_group,
        extra_authorized_keys,
    })
}

/// A volume ID as EC2 makes them, checked before any cloud call (bad input: exit 2).
pub fn check_volume_id(id: &str) -> Result<(), Error> {
    if crate::cloud::valid_volume_id(id) {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "'{id}' is not a volume ID (they look like vol-0123456789abcdef0)"
        )))
    }
}

/// A volume by ID, which must exist in the region.
pub async fn find_volume<C: Cloud>(
    cloud: &C,
    region: &str,
    id: &str,
) -> Result<crate::cloud::Volume, Error> {
    cloud
        .describe_volume(id)
        .await
        .map_err(input)?
        .ok_or_else(|| Error::Invalid(format!("the volume {id} does not exist in {region}")))
}

/// A volume the helper is to attach must be free.
pub fn check_free(v: &crate::cloud::Volume) -> Result<(), Error> {
    if v.state == "available" {
        return Ok(());
    }
    let what = match v.state.as_str() {
        "in-use" => {
            let user = v
                .attachments
                .first()
                .map(|a| format!(" (attached to {})", a.instance))
                .unwrap_or_default();
            format!("is in-use{user}; detach it first")
        }
        "creating" => "is still being created; wait until it is available".to_string(),
        other => format!("is {other} and cannot be used"),
    };
    Err(Error::Invalid(format!("the volume {} {what}", v.id)))
}

/// A lookup that failed because of the user's input is bad input (exit 2), not a failure.
pub fn input(e: CloudError) -> Error {
    if e.is_bad_input() {
        Error::Invalid(e.message)
    } else {
        Error::Cloud(e)
    }
}
