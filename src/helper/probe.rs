//! What a volume named with `-v` holds, and whether this run may write it. A backup tool that
//! writes over a user's own filesystem by mistake is worse than none, so the rule is narrow: a
//! volume is written only when the tool knows what is on it (blank, a dd backup of its own, an
//! ext4 filesystem it made); anything else needs `--overwrite`, and a probe that cannot tell
//! (blkid failing or missing, a read error) refuses whatever the options say about contents.
//! A volume the run created is blank by construction and is never probed.

use std::collections::BTreeMap;

use crate::method::Method;
use crate::tags::key;

/// The label of every filesystem the tool makes.
pub const FS_LABEL: &str = "ec2-backup";

/// Prints one line `KIND [DETAIL]` about the device `$1` and exits 0; any failure to look is
/// reported as `unknown WHY`. blkid -p (low-level probing, no cache) exits 0 when it found
/// something, 2 when it found nothing, 4 on a usage or I/O error and 8 when the signatures are
/// ambiguous; only 2 can mean blank, and then only if the first MiB is zeros too (blkid knows
/// nothing of tar archives or raw database files).
const SCRIPT: &str = r#"set -u -o pipefail
dev=$1
if ! command -v blkid >/dev/null 2>&1; then echo "unknown blkid is not installed on the helper"; exit 0; fi
found=$(blkid -p -o export -- "$dev" 2>&1); rc=$?
case $rc in
  0)
    pttype= type= label=
    while IFS= read -r line; do
      case $line in
        PTTYPE=*) pttype=${line#PTTYPE=} ;;
        TYPE=*) type=${line#TYPE=} ;;
        LABEL=*) label=${line#LABEL=} ;;
      esac
    done <<EOF
$found
EOF
    if [ -n "$pttype" ]; then echo "partitioned $pttype"
    elif [ -n "$type" ]; then echo "filesystem $type $label"
    else echo "unknown blkid found a signature it did not name"; fi ;;
  2)
    magic=$(head -c 262 -- "$dev" | tail -c 5 | tr -d '\000') || { echo "unknown the device could not be read"; exit 0; }
    if [ "$magic" = ustar ]; then echo tar; exit 0; fi
    nonzero=$(head -c 1048576 -- "$dev" | tr -d '\000' | wc -c) || { echo "unknown the device could not be read"; exit 0; }
    if [ "$nonzero" -eq 0 ]; then echo blank; else echo data; fi ;;
  *)
    why=$(printf '%s' "$found" | tr '\n' ' ' | cut -c1-200)
    echo "unknown blkid failed with exit status $rc${why:+ ($why)}" ;;
esac
"#;

/// The remote command (as words) that probes `device`.
pub fn command(device: &str) -> Vec<String> {
    ["sudo", "-n", "bash", "-c", SCRIPT, "probe", device]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Looks at what `device` holds, on the helper.
pub async fn probe(
    ssh: &crate::helper::ssh::Session,
    device: &str,
) -> Result<Content, crate::helper::ssh::SshError> {
    let out = ssh
        .run("Looking at what the volume holds", &command(device))
        .await?;
    Ok(Content::parse(&out))
}

/// What the device holds, as the probe saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// No signature, no tar header, the first MiB all zeros.
    Blank,
    /// A tar archive starting at byte 0.
    Tar,
    Filesystem {
        fstype: String,
        label: String,
    },
    Partitioned(String),
    /// Bytes that nothing recognises: a raw database, an unknown filesystem, noise.
    Data,
    /// The probe could not tell; why.
    Unknown(String),
}

impl Content {
    /// Parses the probe's output line.
    pub fn parse(output: &str) -> Content {
        let line = output
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let (kind, rest) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
        match kind {
            "blank" => Content::Blank,
            "tar" => Content::Tar,
            "data" => Content::Data,
            "partitioned" => Content::Partitioned(rest.to_string()),
            "filesystem" => {
                let (fstype, label) = rest.split_once(' ').unwrap_or((rest, ""));
                Content::Filesystem {
                    fstype: fstype.to_string(),
                    label: label.to_string(),
                }
            }
            "unknown" if !rest.is_empty() => Content::Unknown(rest.to_string()),
            _ => Content::Unknown(format!("the probe printed {:?}", line.trim())),
        }
    }

    /// What it holds, as a user reads it ("a filesystem (xfs)").
    pub fn describe(&self) -> String {
        match self {
            Content::Blank => "nothing".into(),
            Content::Tar => "a tar archive".into(),
            Content::Filesystem { fstype, label } if label.is_empty() => {
                format!("a filesystem ({fstype})")
            }
            Content::Filesystem { fstype, label } => {
                format!("a filesystem ({fstype}, labelled '{label}')")
            }
            Content::Partitioned(t) => format!("a partition table ({t})"),
            Content::Data => "data that is neither blank nor a known format".into(),
            Content::Unknown(why) => why.clone(),
        }
    }
}

/// What the run will do to the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// dd: write the archive from byte 0.
    WriteArchive,
    /// rsync: make a fresh ext4 filesystem, then mirror onto it.
    MakeFilesystem,
    /// rsync: mirror onto the tool's own filesystem already there.
    MirrorOnto,
}

/// Decides what may be done to a `-v` volume holding `content` and carrying `tags`.
/// `overwrite` is the user's explicit consent to destroy whatever it holds. Err: the one
/// sentence saying why nothing was written.
pub fn decide(
    volume_id: &str,
    content: &Content,
    tags: &BTreeMap<String, String>,
    method: Method,
    overwrite: bool,
) -> Result<Plan, String> {
    let tagged = |m: Method| tags.get(key::METHOD).is_some_and(|t| t == m.as_str());
    let (tagged_dd, tagged_rsync) = (tagged(Method::Dd), tagged(Method::Rsync));
    let ours_ext4 = tagged_rsync
        && matches!(content, Content::Filesystem { fstype, label }
            if fstype == "ext4" && label == FS_LABEL);
    let ours_tar = tagged_dd && *content == Content::Tar;
    if let Content::Unknown(why) = content {
        return Err(format!(
            "could not tell what the volume {volume_id} holds ({why}); nothing was written to it"
        ));
    }
    let fresh = match method {
        Method::Dd => Plan::WriteArchive,
        Method::Rsync => Plan::MakeFilesystem,
    };
    match (method, content) {
        (_, Content::Blank) => return Ok(fresh),
        (Method::Dd, _) if ours_tar => return Ok(Plan::WriteArchive),
        (Method::Rsync, _) if ours_ext4 => return Ok(Plan::MirrorOnto),
        _ if overwrite => return Ok(fresh),
        _ => {}
    }
    let what = match () {
        _ if ours_tar => "a dd backup (a tar archive)".to_string(),
        _ if ours_ext4 => "an rsync backup (an ext4 filesystem)".to_string(),
        _ => format!("{} that ec2-backup did not write", content.describe()),
    };
    let advice = match method {
        _ if ours_tar => {
            "back it up with -m dd, pick another volume, or give --overwrite to destroy it"
        }
        _ if ours_ext4 => {
            "back it up with -m rsync, pick another volume, or give --overwrite to destroy it"
        }
        _ => "pick another volume, or give --overwrite to destroy what it holds",
    };
    Err(format!(
        "the volume {volume_id} holds {what}; refusing to write it ({advice})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(method: &str) -> BTreeMap<String, String> {
        [(key::METHOD.to_string(), method.to_string())].into()
    }

    fn ext4(label: &str) -> Content {
        Content::Filesystem {
            fstype: "ext4".into(),
            label: label.into(),
        }
    }

    #[test]
    fn parses_every_kind() {
        assert_eq!(Content::parse("blank\n"), Content::Blank);
        assert_eq!(Content::parse("tar\n"), Content::Tar);
        assert_eq!(Content::parse("data\n"), Content::Data);
        assert_eq!(
            Content::parse("filesystem ext4 ec2-backup\n"),
            ext4(FS_LABEL)
        );
        assert_eq!(
            Content::parse("filesystem xfs \n"),
            Content::Filesystem {
                fstype: "xfs".into(),
                label: "".into()
            }
        );
        assert_eq!(
            Content::parse("partitioned gpt"),
            Content::Partitioned("gpt".into())
        );
        assert!(
            matches!(Content::parse("unknown blkid failed"), Content::Unknown(w) if w == "blkid failed")
        );
        // Anything unexpected is "cannot tell", never "blank".
        assert!(matches!(Content::parse(""), Content::Unknown(_)));
        assert!(matches!(Content::parse("blankish"), Content::Unknown(_)));
    }

    #[test]
    fn writes_only_what_it_knows() {
        let none = BTreeMap::new();
        let ok = |c: &Content, t: &BTreeMap<String, String>, m| decide("vol-1", c, t, m, false);
        assert_eq!(
            ok(&Content::Blank, &none, Method::Dd),
            Ok(Plan::WriteArchive)
        );
        assert_eq!(
            ok(&Content::Blank, &none, Method::Rsync),
            Ok(Plan::MakeFilesystem)
        );
        assert_eq!(
            ok(&Content::Tar, &tags("dd"), Method::Dd),
            Ok(Plan::WriteArchive)
        );
        assert_eq!(
            ok(&ext4(FS_LABEL), &tags("rsync"), Method::Rsync),
            Ok(Plan::MirrorOnto)
        );
        // A user's own filesystem, data, a foreign archive, a partition table: refused.
        for (c, t, m) in [
            (ext4("data"), tags("rsync"), Method::Rsync),
            (ext4(FS_LABEL), none.clone(), Method::Rsync),
            (ext4(FS_LABEL), tags("rsync"), Method::Dd),
            (Content::Tar, none.clone(), Method::Dd),
            (Content::Tar, tags("dd"), Method::Rsync),
            (Content::Data, none.clone(), Method::Dd),
            (Content::Data, none.clone(), Method::Rsync),
            (Content::Partitioned("dos".into()), none.clone(), Method::Dd),
        ] {
            let e = ok(&c, &t, m).unwrap_err();
            assert!(e.contains("refusing to write it"), "{c:?} {m:?}: {e}");
        }
        let e = ok(&ext4("home"), &none, Method::Rsync).unwrap_err();
        assert!(
            e.contains("holds a filesystem (ext4, labelled 'home') that ec2-backup did not write")
                && e.contains("--overwrite"),
            "{e}"
        );
        let e = ok(&Content::Tar, &tags("dd"), Method::Rsync).unwrap_err();
        assert!(e.contains("-m dd"), "{e}");
    }

    #[test]
    fn overwrite_replaces_foreign_contents_but_never_a_probe_that_failed() {
        let none = BTreeMap::new();
        let forced = |c: &Content, m| decide("vol-1", c, &none, m, true);
        assert_eq!(
            forced(&ext4("home"), Method::Rsync),
            Ok(Plan::MakeFilesystem)
        );
        assert_eq!(forced(&Content::Data, Method::Dd), Ok(Plan::WriteArchive));
        let e = forced(&Content::Unknown("blkid failed".into()), Method::Dd).unwrap_err();
        assert!(
            e.contains("could not tell") && e.contains("blkid failed"),
            "{e}"
        );
    }
}
