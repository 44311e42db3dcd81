//! Everything decided before anything is created: the options from the command line and
//! environment, the directory's inventory, and the cloud lookups that can still refuse the
//! run (volume, zone, instance type, image, key pair). Bad input fails here, with nothing made.

use std::path::PathBuf;
use std::time::Duration;

use crate::cloud::{caller, Arch, Cloud, CloudError, RootDisk, Volume};
use crate::error::Error;
use crate::flags::{LaunchFlags, SshFlags};
use crate::keys::{self, KeyPlan, DEFAULT_KEY_NAME};
use crate::method::Method;
use crate::plan::{self, Inventory};
use crate::report::Reporter;

/// The default helper: small, cheap, current, Nitro, x86_64.
pub const DEFAULT_INSTANCE_TYPE: &str = "t3.micro";

/// How long a helper outlives its last heartbeat (EC2_BACKUP_WATCHDOG_SECONDS): long enough
/// for a slow boot and a congested link, short enough that a dead run costs minutes.
pub const DEFAULT_WATCHDOG: Duration = Duration::from_secs(300);

/// What the user asked for, read from the command line and the environment.
#[derive(Debug, Clone)]
pub struct Options {
    pub method: Method,
    pub volume: Option<String>,
    pub dir: PathBuf,
    pub launch: LaunchFlags,
    pub ssh: SshFlags,
    pub home: PathBuf,
    pub verbose: bool,
    /// How long the helper may take to accept ssh after it is running.
    pub boot_timeout: Duration,
    pub json: bool,
    pub dry_run: bool,
    /// Write a `-v` volume whatever it holds.
    pub overwrite: bool,
    /// How long the helper outlives its last heartbeat from this run.
    pub watchdog: Duration,
}

impl Options {
    /// Builds the options from the parsed command line and the process environment.
    pub fn new(cli: crate::cli::Cli) -> Result<Self, Error> {
        let crate::cli::Cli {
            method,
            volume,
            dir,
            json,
            dry_run,
            overwrite,
        } = cli;
        let method = method.as_str();
        let method = Method::parse(method).ok_or_else(|| {
            Error::Usage(format!("unknown method '{method}': use -m dd or -m rsync"))
        })?;
        if let Some(v) = &volume {
            if !valid_volume_id(v) {
                return Err(Error::Usage(format!(
                    "'{v}' is not a volume ID (they look like vol-0123456789abcdef0)"
                )));
            }
        }
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
        let boot_timeout = match std::env::var("EC2_BACKUP_BOOT_TIMEOUT") {
            Ok(s) => Duration::from_secs(s.trim().parse().map_err(|_| {
                Error::Usage(format!(
                    "EC2_BACKUP_BOOT_TIMEOUT must be a whole number of seconds, not '{s}'"
                ))
            })?),
            Err(_) => Duration::from_secs(300),
        };
        let watchdog = match std::env::var("EC2_BACKUP_WATCHDOG_SECONDS") {
            Ok(s) => match s.trim().parse::<u64>() {
                Ok(n) if n >= 5 => Duration::from_secs(n),
                _ => {
                    return Err(Error::Usage(format!(
                        "EC2_BACKUP_WATCHDOG_SECONDS must be a whole number of seconds, at least 5, not '{s}'"
                    )))
                }
            },
            Err(_) => DEFAULT_WATCHDOG,
        };
        Ok(Options {
            method,
            volume,
            dir,
            launch,
            ssh,
            home,
            verbose: crate::report::verbose_from_env(),
            boot_timeout,
            json,
            dry_run,
            overwrite,
            watchdog,
        })
    }
}

/// `vol-` and 8 or 17 lowercase hex digits, as EC2 makes them.
pub fn valid_volume_id(id: &str) -> bool {
    id.strip_prefix("vol-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

/// The decided run: nothing of it exists yet.
#[derive(Debug, Clone)]
pub struct Plan {
    pub dir: PathBuf,
    pub inventory: Inventory,
    /// The dd archive's exact length, measured when it must fit a `-v` volume.
    pub archive_bytes: Option<u64>,
    /// The user's volume (`-v`), already checked.
    pub existing_volume: Option<Volume>,
    /// Size of the volume to create when there is no `-v`.
    pub new_volume_gib: i32,
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

/// What is checked before any cloud call: the directory, and the public keys of the
/// identities the ssh flags name. (The directory's inventory is taken while the cloud
/// lookups run.)
#[derive(Debug, Clone)]
pub struct Local {
    pub dir: PathBuf,
    pub extra_authorized_keys: Vec<String>,
}

/// A security group to create: in this VPC, admitting ssh from this CIDR only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshGroup {
    pub vpc: String,
    pub cidr: String,
}

/// Checks the directory and what can be checked locally, before any cloud call.
pub fn check_local(options: &Options, report: &Reporter) -> Result<Local, Error> {
    let dir = plan::check_dir(&options.dir)?;
    let mut extra = Vec::new();
    for identity in options.ssh.identities() {
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
    Ok(Local {
        dir,
        extra_authorized_keys: extra,
    })
}

/// The sizing walk, on a thread of its own so the cloud lookups go on meanwhile. Not a
/// tokio blocking task: a walk stuck in a hung network mount must not keep a run that was
/// interrupted from exiting (the runtime waits for its blocking tasks; a plain thread ends
/// with the process).
async fn take_inventory(dir: &std::path::Path, report: &Reporter) -> Result<Inventory, Error> {
    report.step(&format!("sizing {}", dir.display()));
    let owned = dir.to_path_buf();
    let (done, walked) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ec2-backup-walk".into())
        .spawn(move || {
            let _ = done.send(plan::inventory(&owned));
        })
        .map_err(|e| Error::Invalid(format!("sizing {} failed: {e}", dir.display())))?;
    let inventory = walked
        .await
        .map_err(|_| plan::PlanError::Walk(dir.to_path_buf()))??;
    report.step(&format!(
        "{} entries, {} bytes of data",
        inventory.entries, inventory.data_bytes
    ));
    Ok(inventory)
}

/// The cloud lookups that decide the run. Independent lookups run concurrently.
pub async fn decide<C: Cloud>(
    cloud: &C,
    region: &str,
    options: &Options,
    local: Local,
    report: &Reporter,
) -> Result<Plan, Error> {
    let Local {
        dir,
        extra_authorized_keys,
    } = local;
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

    let volume_lookup = async {
        match &options.volume {
            Some(id) => cloud.describe_volume(id).await.map(Some),
            None => Ok(None),
        }
    };
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
            return Ok((None, None));
        }
        let vpc = match &options.launch.subnet_id {
            Some(_) => None,
            None => cloud.default_vpc().await?,
        };
        Ok::<_, CloudError>((vpc, Some(caller::ingress_cidr().await?)))
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
    // A dd archive must fit a `-v` volume exactly; its length is measured after the walk
    // (which finds the pseudo-filesystems the archive leaves out).
    let measure = options.volume.is_some() && options.method == Method::Dd;
    let sizing = async {
        let inventory = take_inventory(&dir, report).await?;
        if !measure {
            return Ok::<_, Error>((inventory, None));
        }
        let source = crate::method::Source {
            dir: dir.clone(),
            skip_contents_of: inventory.pseudo_mounts.clone(),
        };
        let bytes = crate::method::dd::archive_size(&source).await?;
        report.step(&format!("the archive will be {bytes} bytes"));
        Ok((inventory, Some(bytes)))
    };
    let (sizing, volume, subnet, network, arch_image, zones, key_exists) = tokio::join!(
        sizing,
        volume_lookup,
        subnet_lookup,
        network,
        arch_and_image,
        cloud.zones_for(&instance_type),
        cloud.key_pair_tags(&key_name),
    );
    let (inventory, archive_bytes) = sizing?;
    let volume = volume.map_err(input)?;
    let (arch, image_id, root_disk) = arch_image.map_err(input)?;
    let zones = zones.map_err(input)?;
    let existing_volume = match (&options.volume, volume) {
        (Some(id), None) => Err(Error::Invalid(format!(
            "the volume {id} does not exist in {region}"
        )))?,
        (Some(_), Some(Some(v))) => {
            Some(check_volume(v, &inventory, archive_bytes, options.method)?)
        }
        (Some(id), Some(None)) => Err(Error::Invalid(format!(
            "the volume {id} does not exist in {region}"
        )))?,
        (None, _) => None,
    };
    let subnet = subnet.map_err(input)?;
    let (default_vpc, cidr) = network.map_err(input)?;
    let ssh_group = match (cidr, subnet.as_ref().map(|(_, vpc)| vpc.clone()).or(default_vpc)) {
        (None, _) => None,
        (Some(cidr), Some(vpc)) => Some(SshGroup { vpc, cidr }),
        (Some(_), None) => {
            return Err(Error::Invalid(format!(
                "there is no default VPC in {region}; name a subnet and a security group that admits ssh with EC2_BACKUP_FLAGS_AWS=\"--subnet-id ID --security-group-ids ID\""
            )))
        }
    };
    let zone = match (subnet.map(|(zone, _)| zone), &existing_volume) {
        (Some(sz), Some(v)) if sz != v.zone => {
            return Err(Error::Invalid(format!(
                "the subnet is in {sz} but the volume {} is in {}; choose a subnet in {}",
                v.id, v.zone, v.zone
            )))
        }
        (Some(sz), _) => sz,
        (None, Some(v)) => v.zone.clone(),
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
    Ok(Plan {
        new_volume_gib: plan::volume_gib(inventory.footprint),
        dir,
        inventory,
        archive_bytes,
        existing_volume,
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

/// A lookup that failed because of the user's input is bad input (exit 2), not a failure.
pub fn input(e: CloudError) -> Error {
    if e.is_bad_input() {
        Error::Invalid(e.message)
    } else {
        Error::Cloud(e)
    }
}

/// A `-v` volume must be free and big enough: for dd, for the archive's measured length
/// (`archive`); for rsync, roughly here, exactly once its filesystem is mounted.
fn check_volume(
    v: Volume,
    inventory: &Inventory,
    archive: Option<u64>,
    method: Method,
) -> Result<Volume, Error> {
    if v.state != "available" {
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
        return Err(Error::Invalid(format!("the volume {} {what}", v.id)));
    }
    let (fits, needed) = match archive {
        Some(bytes) => (crate::method::dd::archive_fits(bytes, v.size_gib), bytes),
        None => (
            plan::fits(inventory.footprint, v.size_gib, method.uses_filesystem()),
            inventory.footprint,
        ),
    };
    if !fits {
        return Err(Error::Invalid(format!(
            "the volume {} has {} GiB, too small for this directory (about {} MiB needed)",
            v.id,
            v.size_gib,
            needed.div_ceil(1 << 20)
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids() {
        assert!(valid_volume_id("vol-0123456789abcdef0"));
        assert!(valid_volume_id("vol-1a2b3c4d"));
        assert!(!valid_volume_id("vol-0123456789ABCDEF0"));
        assert!(!valid_volume_id("vol-123"));
        assert!(!valid_volume_id("i-0123456789abcdef0"));
        assert!(!valid_volume_id("vol-0123456789abcdefg"));
    }

    #[test]
    fn user_volumes_must_be_free_and_big_enough() {
        let inv = Inventory {
            footprint: 3 << 30,
            ..Inventory::default()
        };
        let v = |state: &str, size| Volume {
            id: "vol-1".into(),
            state: state.into(),
            size_gib: size,
            zone: "z".into(),
            attachments: vec![],
            tags: Default::default(),
        };
        assert!(check_volume(v("available", 4), &inv, None, Method::Dd).is_ok());
        let e = check_volume(v("in-use", 4), &inv, None, Method::Dd).unwrap_err();
        assert!(e.to_string().contains("in-use"), "{e}");
        let e = check_volume(v("available", 2), &inv, None, Method::Dd).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        // The measured archive decides for dd, whatever the rough footprint says: 1 GiB of
        // archive does not fit 1 GiB (no room for its last record and growth).
        let small = Inventory::default();
        assert!(check_volume(v("available", 1), &small, Some(1 << 30), Method::Dd).is_err());
        assert!(check_volume(v("available", 1), &small, Some(1000 << 20), Method::Dd).is_ok());
    }
}
