//! The real cloud: the AWS SDK for Rust. Retries (jittered exponential backoff for throttling
//! and transient errors) live in the SDK's standard retry mode and nowhere else; every call has
//! an attempt timeout and an overall timeout so a dead endpoint cannot hang a run.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::primitives::Blob;
use aws_sdk_ec2::types::{
    ArchitectureType, BlockDeviceMapping, EbsBlockDevice, EbsInstanceBlockDeviceSpecification,
    Filter, HttpTokensState, IamInstanceProfileSpecification,
    InstanceBlockDeviceMappingSpecification, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceType, IpPermission, IpRange, Ipv6Range, LocationType,
    Placement, ResourceType, ShutdownBehavior, Tag, TagSpecification, VolumeType,
};
use base64::Engine;

use std::collections::BTreeMap;

use super::{
    Arch, Attachment, Cloud, CloudError, CloudResult, Instance, LaunchRequest, ResourceKind,
    RootDisk, Tagged, Tags, Volume,
};

mod snapshots;

#[derive(Clone)]
pub struct AwsCloud {
    ec2: aws_sdk_ec2::Client,
    ssm: aws_sdk_ssm::Client,
    pub region: String,
    /// The KMS key for the volumes (and so the snapshots) this tool creates; None: the
    /// region's default EBS key.
    kms_key_id: Option<String>,
}

impl AwsCloud {
    /// CreateVolume: gp3, encrypted (with the run's key, if any), empty or from `snapshot`.
    async fn new_volume(
        &self,
        zone: &str,
        size_gib: i32,
        snapshot: Option<&str>,
        tags: &Tags,
    ) -> CloudResult<String> {
        let action = match snapshot {
            Some(_) => "Creating a volume from the snapshot",
            None => "Creating the volume",
        };
        let out = self
            .ec2
            .create_volume()
            .availability_zone(zone)
            .size(size_gib)
            .set_snapshot_id(snapshot.map(str::to_string))
            .volume_type(VolumeType::Gp3)
            .encrypted(true)
            .set_kms_key_id(self.kms_key_id.clone())
            .tag_specifications(tag_spec(ResourceType::Volume, tags))
            .send()
            .await
            .map_err(|e| fail(action, e))?;
        out.volume_id()
            .map(str::to_string)
            .ok_or_else(|| CloudError::new(action, "EC2 returned no volume ID"))
    }

    /// Volumes made from now on are encrypted with this KMS key (ID, ARN or alias).
    pub fn with_kms_key(mut self, key: Option<String>) -> Self {
        self.kms_key_id = key;
        self
    }
}

/// Loads the standard AWS configuration (profiles, environment, SSO, instance roles; and
/// `AWS_ENDPOINT_URL`, which is how the local simulator is reached) without changing it.
pub async fn connect() -> CloudResult<AwsCloud> {
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(10))
        .operation_attempt_timeout(Duration::from_secs(30))
        .operation_timeout(Duration::from_secs(120))
        .build();
    let config = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(timeouts)
        .retry_config(RetryConfig::standard().with_max_attempts(8))
        .load()
        .await;
    let region = config
        .region()
        .map(|r| r.to_string())
        .filter(|r| !r.is_empty())
        .ok_or_else(|| {
            CloudError::config(
                "Loading the AWS configuration",
                "no AWS region is configured; set AWS_REGION or a region in ~/.aws/config",
            )
        })?;
    Ok(AwsCloud {
        ec2: aws_sdk_ec2::Client::new(&config),
        ssm: aws_sdk_ssm::Client::new(&config),
        region,
        kms_key_id: None,
    })
}

/// Turns an SDK error into a [`CloudError`] carrying EC2's code and message.
fn fail<E, R>(action: &'static str, err: SdkError<E, R>) -> CloudError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let (code, message) = match &err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            (
                e.code().map(str::to_string),
                e.message()
                    .map(str::to_string)
                    .unwrap_or_else(|| e.to_string()),
            )
        }
        SdkError::TimeoutError(_) => (None, "the request timed out".to_string()),
        SdkError::DispatchFailure(d) => (
            None,
            match d.as_connector_error() {
                Some(c) => format!("the AWS endpoint could not be reached ({c})"),
                None => "the AWS endpoint could not be reached".to_string(),
            },
        ),
        other => (None, other.to_string()),
    };
    let message = match &code {
        Some(c) if !message.contains(c.as_str()) => format!("{message} ({c})"),
        _ => message,
    };
    CloudError {
        action,
        code,
        message,
    }
}

fn is_code<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>, prefix: &str) -> bool {
    err.code().is_some_and(|c| c.starts_with(prefix))
}

fn tag_spec(kind: ResourceType, tags: &Tags) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(sdk_tags(tags)))
        .build()
}

fn tag_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
        .collect()
}

fn sdk_tags(tags: &Tags) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

impl Cloud for AwsCloud {
    async fn describe_volume(&self, id: &str) -> CloudResult<Option<Volume>> {
        let out = match self.ec2.describe_volumes().volume_ids(id).send().await {
            Ok(out) => out,
            Err(e) if is_code(&e, "InvalidVolume.NotFound") => return Ok(None),
            Err(e) => return Err(fail("Describing the volume", e)),
        };
        Ok(out.volumes().first().map(|v| Volume {
            id: v.volume_id().unwrap_or(id).to_string(),
            state: v
                .state()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            size_gib: v.size().unwrap_or(0),
            zone: v.availability_zone().unwrap_or_default().to_string(),
            attachments: v
                .attachments()
                .iter()
                .map(|a| Attachment {
                    instance: a.instance_id().unwrap_or_default().to_string(),
                    device: a.device().unwrap_or_default().to_string(),
                    state: a
                        .state()
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_default(),
                    delete_on_termination: a.delete_on_termination().unwrap_or(false),
                })
                .collect(),
            tags: tag_map(v.tags()),
        }))
    }

    async fn create_volume(&self, zone: &str, size_gib: i32, tags: &Tags) -> CloudResult<String> {
        self.new_volume(zone, size_gib, None, tags).await
    }

    async fn delete_volume(&self, id: &str) -> CloudResult<()> {
        match self.ec2.delete_volume().volume_id(id).send().await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, "InvalidVolume.NotFound") => Ok(()),
            Err(e) => Err(fail("Deleting the volume", e)),
        }
    }

    async fn attach_volume(&self, volume: &str, instance: &str, device: &str) -> CloudResult<()> {
        self.ec2
            .attach_volume()
            .volume_id(volume)
            .instance_id(instance)
            .device(device)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| fail("Attaching the volume", e))
    }

    async fn detach_volume(&self, volume: &str, instance: &str) -> CloudResult<()> {
        match self
            .ec2
            .detach_volume()
            .volume_id(volume)
            .instance_id(instance)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // Already detached (or the instance is gone): nothing left to do.
            Err(e)
                if is_code(&e, "IncorrectState") || is_code(&e, "InvalidAttachment.NotFound") =>
            {
                Ok(())
            }
            Err(e) => Err(fail("Detaching the volume", e)),
        }
    }

    async fn set_delete_on_termination(
        &self,
        instance: &str,
        device: &str,
        volume: &str,
        delete: bool,
    ) -> CloudResult<()> {
        let mapping = InstanceBlockDeviceMappingSpecification::builder()
            .device_name(device)
            .ebs(
                EbsInstanceBlockDeviceSpecification::builder()
                    .volume_id(volume)
                    .delete_on_termination(delete)
                    .build(),
            )
            .build();
        self.ec2
            .modify_instance_attribute()
            .instance_id(instance)
            .block_device_mappings(mapping)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| fail("Setting the volume's DeleteOnTermination", e))
    }

    async fn create_tags(&self, id: &str, tags: &Tags) -> CloudResult<()> {
        self.ec2
            .create_tags()
            .resources(id)
            .set_tags(Some(sdk_tags(tags)))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| fail("Tagging", e))
    }

    async fn run_instance(&self, r: &LaunchRequest) -> CloudResult<String> {
        let profile = r.iam_instance_profile.as_ref().map(|p| {
            let b = IamInstanceProfileSpecification::builder();
            if let Some(arn) = p.strip_prefix("Arn=") {
                b.arn(arn).build()
            } else if p.starts_with("arn:") {
                b.arn(p).build()
            } else {
                b.name(p.strip_prefix("Name=").unwrap_or(p)).build()
            }
        });
        let placement = r
            .subnet_id
            .is_none()
            .then(|| Placement::builder().availability_zone(&r.zone).build());
        let user_data = base64::engine::general_purpose::STANDARD.encode(&r.user_data);
        let out = self
            .ec2
            .run_instances()
            .image_id(&r.image_id)
            .instance_type(InstanceType::from(r.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .key_name(&r.key_name)
            .set_subnet_id(r.subnet_id.clone())
            .set_security_group_ids(
                (!r.security_group_ids.is_empty()).then(|| r.security_group_ids.clone()),
            )
            .set_iam_instance_profile(profile)
            .set_placement(placement)
            .user_data(user_data)
            .set_block_device_mappings(r.root_disk.as_ref().map(|root| {
                // The helper's own disk is encrypted too, and goes with it.
                vec![BlockDeviceMapping::builder()
                    .device_name(&root.device)
                    .ebs(
                        EbsBlockDevice::builder()
                            .encrypted(true)
                            .set_kms_key_id(self.kms_key_id.clone())
                            .set_volume_size(root.size_gib)
                            .delete_on_termination(true)
                            .volume_type(VolumeType::Gp3)
                            .build(),
                    )
                    .build()]
            }))
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            // A helper that shuts itself down must not linger as a stopped instance.
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .tag_specifications(tag_spec(ResourceType::Instance, &r.tags))
            .tag_specifications(tag_spec(ResourceType::Volume, &r.tags))
            .send()
            .await
            .map_err(|e| fail("Launching the helper instance", e))?;
        out.instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(str::to_string)
            .ok_or_else(|| {
                CloudError::new("Launching the helper instance", "EC2 returned no instance")
            })
    }

    async fn describe_instance(&self, id: &str) -> CloudResult<Option<Instance>> {
        let out = match self.ec2.describe_instances().instance_ids(id).send().await {
            Ok(out) => out,
            Err(e) if is_code(&e, "InvalidInstanceID.NotFound") => return Ok(None),
            Err(e) => return Err(fail("Describing the helper instance", e)),
        };
        let found = out.reservations().iter().flat_map(|r| r.instances()).next();
        Ok(found.map(|i| Instance {
            id: i.instance_id().unwrap_or(id).to_string(),
            state: i
                .state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_string())
                .unwrap_or_default(),
            zone: i
                .placement()
                .and_then(|p| p.availability_zone())
                .unwrap_or_default()
                .to_string(),
            address: i
                .public_ip_address()
                .or(i.private_ip_address())
                .map(str::to_string),
            public_address: i.public_ip_address().is_some(),
        }))
    }

    async fn terminate_instance(&self, id: &str) -> CloudResult<()> {
        match self.ec2.terminate_instances().instance_ids(id).send().await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, "InvalidInstanceID.NotFound") => Ok(()),
            Err(e) => Err(fail("Terminating the helper instance", e)),
        }
    }

    async fn key_pair_tags(&self, name: &str) -> CloudResult<Option<BTreeMap<String, String>>> {
        match self.ec2.describe_key_pairs().key_names(name).send().await {
            Ok(out) => Ok(out.key_pairs().first().map(|k| tag_map(k.tags()))),
            Err(e) if is_code(&e, "InvalidKeyPair.NotFound") => Ok(None),
            Err(e) => Err(fail("Looking up the key pair", e)),
        }
    }

    async fn import_key_pair(&self, name: &str, public_key: &str, tags: &Tags) -> CloudResult<()> {
        self.ec2
            .import_key_pair()
            .key_name(name)
            .public_key_material(Blob::new(public_key.as_bytes()))
            .tag_specifications(tag_spec(ResourceType::KeyPair, tags))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| fail("Importing the key pair", e))
    }

    async fn current_image(&self, arch: Arch) -> CloudResult<String> {
        let name = format!(
            "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{}",
            arch.as_str()
        );
        let out = self
            .ssm
            .get_parameter()
            .name(&name)
            .send()
            .await
            .map_err(|e| fail("Looking up the current Amazon Linux image", e))?;
        out.parameter()
            .and_then(|p| p.value())
            .map(str::to_string)
            .ok_or_else(|| {
                CloudError::new(
                    "Looking up the current Amazon Linux image",
                    format!("the SSM parameter {name} has no value"),
                )
            })
    }

    async fn instance_arch(&self, instance_type: &str) -> CloudResult<Arch> {
        let out = self
            .ec2
            .describe_instance_types()
            .instance_types(InstanceType::from(instance_type))
            .send()
            .await
            .map_err(|e| fail("Looking up the instance type", e))?;
        let info = out.instance_types().first().ok_or_else(|| {
            CloudError::config(
                "Looking up the instance type",
                format!("EC2 does not know the instance type {instance_type}"),
            )
        })?;
        let archs = info
            .processor_info()
            .map(|p| p.supported_architectures())
            .unwrap_or_default();
        Ok(
            if archs.contains(&ArchitectureType::Arm64) && !archs.contains(&ArchitectureType::X8664)
            {
                Arch::Arm64
            } else {
                Arch::X86_64
            },
        )
    }

    async fn zones_for(&self, instance_type: &str) -> CloudResult<Vec<String>> {
        let zones = self
            .ec2
            .describe_availability_zones()
            .send()
            .await
            .map_err(|e| fail("Listing availability zones", e))?;
        let mut available: Vec<String> = zones
            .availability_zones()
            .iter()
            .filter(|z| z.state().is_some_and(|s| s.as_str() == "available"))
            .filter_map(|z| z.zone_name().map(str::to_string))
            .collect();
        available.sort();
        let offered = self
            .ec2
            .describe_instance_type_offerings()
            .location_type(LocationType::AvailabilityZone)
            .filters(
                Filter::builder()
                    .name("instance-type")
                    .values(instance_type)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| fail("Listing where the instance type is offered", e))?;
        let offered: Vec<&str> = offered
            .instance_type_offerings()
            .iter()
            .filter_map(|o| o.location())
            .collect();
        Ok(available
            .into_iter()
            .filter(|z| offered.contains(&z.as_str()))
            .collect())
    }

    async fn subnet_info(&self, subnet_id: &str) -> CloudResult<(String, String)> {
        let out = self
            .ec2
            .describe_subnets()
            .subnet_ids(subnet_id)
            .send()
            .await
            .map_err(|e| fail("Looking up the subnet", e))?;
        out.subnets()
            .first()
            .and_then(|s| Some((s.availability_zone()?.to_string(), s.vpc_id()?.to_string())))
            .ok_or_else(|| {
                CloudError::new(
                    "Looking up the subnet",
                    format!("the subnet {subnet_id} does not exist"),
                )
            })
    }

    async fn default_vpc(&self) -> CloudResult<Option<String>> {
        let out = self
            .ec2
            .describe_vpcs()
            .filters(Filter::builder().name("isDefault").values("true").build())
            .send()
            .await
            .map_err(|e| fail("Looking up the default VPC", e))?;
        Ok(out
            .vpcs()
            .first()
            .and_then(|v| v.vpc_id())
            .map(str::to_string))
    }

    async fn find_group(&self, vpc: &str, name: &str) -> CloudResult<Option<String>> {
        let by = |n: &str, v: &str| Filter::builder().name(n).values(v).build();
        let out = self
            .ec2
            .describe_security_groups()
            .filters(by("vpc-id", vpc))
            .filters(by("group-name", name))
            .send()
            .await
            .map_err(|e| fail("Looking up the helpers' security group", e))?;
        Ok(out
            .security_groups()
            .first()
            .and_then(|g| g.group_id())
            .map(str::to_string))
    }

    async fn create_group(&self, name: &str, vpc: &str, tags: &Tags) -> CloudResult<String> {
        let action = "Creating the helpers' security group";
        let out = self
            .ec2
            .create_security_group()
            .group_name(name)
            .description("ec2-backup helpers: ssh from the machines running backups only")
            .vpc_id(vpc)
            .tag_specifications(tag_spec(ResourceType::SecurityGroup, tags))
            .send()
            .await
            .map_err(|e| fail(action, e))?;
        out.group_id()
            .map(str::to_string)
            .ok_or_else(|| CloudError::new(action, "EC2 returned no group ID"))
    }

    async fn allow_ssh(&self, group: &str, cidr: &str) -> CloudResult<()> {
        let range = if cidr.contains(':') {
            IpPermission::builder().ipv6_ranges(
                Ipv6Range::builder()
                    .cidr_ipv6(cidr)
                    .description("ec2-backup caller")
                    .build(),
            )
        } else {
            IpPermission::builder().ip_ranges(
                IpRange::builder()
                    .cidr_ip(cidr)
                    .description("ec2-backup caller")
                    .build(),
            )
        };
        let rule = range.ip_protocol("tcp").from_port(22).to_port(22).build();
        match self
            .ec2
            .authorize_security_group_ingress()
            .group_id(group)
            .ip_permissions(rule)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, "InvalidPermission.Duplicate") => Ok(()),
            Err(e) => Err(fail(
                "Letting ssh in through the helpers' security group",
                e,
            )),
        }
    }

    async fn delete_security_group(&self, id: &str) -> CloudResult<()> {
        match self.ec2.delete_security_group().group_id(id).send().await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, "InvalidGroup.NotFound") => Ok(()),
            Err(e) => Err(fail("Deleting the helper's security group", e)),
        }
    }

    /// Every page of the listing: an account with many backups has more than one.
    async fn tagged(&self, kind: ResourceKind, key: &str) -> CloudResult<Vec<Tagged>> {
        let filter = Filter::builder().name("tag-key").values(key).build();
        let action = "Listing resources made by ec2-backup";
        let state = |s: Option<&str>| s.unwrap_or_default().to_string();
        Ok(match kind {
            ResourceKind::Instance => self
                .ec2
                .describe_instances()
                .filters(filter)
                .into_paginator()
                .send()
                .try_collect()
                .await
                .map_err(|e| fail(action, e))?
                .iter()
                .flat_map(|page| page.reservations())
                .flat_map(|r| r.instances())
                .map(|i| Tagged {
                    id: i.instance_id().unwrap_or_default().to_string(),
                    state: state(i.state().and_then(|s| s.name()).map(|n| n.as_str())),
                    tags: tag_map(i.tags()),
                    launched: i
                        .launch_time()
                        .and_then(|t| chrono::DateTime::from_timestamp(t.secs(), 0))
                        .map(|t| t.to_rfc3339()),
                    size_gib: None,
                })
                .collect(),
            ResourceKind::Volume => self
                .ec2
                .describe_volumes()
                .filters(filter)
                .into_paginator()
                .send()
                .try_collect()
                .await
                .map_err(|e| fail(action, e))?
                .iter()
                .flat_map(|page| page.volumes())
                .map(|v| Tagged {
                    id: v.volume_id().unwrap_or_default().to_string(),
                    state: state(v.state().map(|s| s.as_str())),
                    tags: tag_map(v.tags()),
                    launched: None,
                    size_gib: v.size(),
                })
                .collect(),
            ResourceKind::SecurityGroup => self
                .ec2
                .describe_security_groups()
                .filters(filter)
                .into_paginator()
                .send()
                .try_collect()
                .await
                .map_err(|e| fail(action, e))?
                .iter()
                .flat_map(|page| page.security_groups())
                .map(|g| Tagged {
                    id: g.group_id().unwrap_or_default().to_string(),
                    state: "available".to_string(),
                    tags: tag_map(g.tags()),
                    launched: None,
                    size_gib: None,
                })
                .collect(),
        })
    }

    async fn image_info(&self, image_id: &str) -> CloudResult<Option<(Arch, RootDisk)>> {
        let out = match self.ec2.describe_images().image_ids(image_id).send().await {
            Ok(out) => out,
            Err(e) if is_code(&e, "InvalidAMIID") => return Ok(None),
            Err(e) => return Err(fail("Looking up the image", e)),
        };
        Ok(out.images().first().map(|i| {
            let arch = match i.architecture().map(|a| a.as_str()) {
                Some("arm64") | Some("arm64_mac") => Arch::Arm64,
                _ => Arch::X86_64,
            };
            let root = i.root_device_name().unwrap_or("/dev/xvda").to_string();
            let size = i
                .block_device_mappings()
                .iter()
                .find(|m| m.device_name() == Some(root.as_str()))
                .and_then(|m| m.ebs())
                .and_then(|e| e.volume_size());
            (
                arch,
                RootDisk {
                    device: root,
                    size_gib: size,
                },
            )
        }))
    }

    async fn missing_security_groups(&self, ids: &[String]) -> CloudResult<Vec<String>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let found = match self
            .ec2
            .describe_security_groups()
            .set_group_ids(Some(ids.to_vec()))
            .send()
            .await
        {
            Ok(out) => out
                .security_groups()
                .iter()
                .filter_map(|g| g.group_id().map(str::to_string))
                .collect::<Vec<_>>(),
            Err(e) if is_code(&e, "InvalidGroup") => Vec::new(),
            Err(e) => return Err(fail("Looking up the security groups", e)),
        };
        Ok(ids
            .iter()
            .filter(|id| !found.contains(id))
            .cloned()
            .collect())
    }
}
