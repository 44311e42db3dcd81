//! The two environment variables that pass extra flags through: `EC2_BACKUP_FLAGS_AWS` (helper
//! launch options in `aws ec2 run-instances` spelling) and `EC2_BACKUP_FLAGS_SSH` (words added
//! to every ssh the tool runs). Both are split like a shell would split them, but never run
//! through one.

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FlagsError {
    #[error("{var} has unbalanced quotes")]
    Unbalanced { var: &'static str },
    #[error("{var}: unsupported flag '{flag}' (supported: {supported})")]
    Unsupported {
        var: &'static str,
        flag: String,
        supported: String,
    },
    #[error("{var}: flag '{flag}' needs a value")]
    MissingValue { var: &'static str, flag: String },
    #[error("{var}: flag '{flag}' is given twice")]
    Repeated { var: &'static str, flag: String },
    #[error("{var}: unexpected word '{word}' (flags start with --)")]
    Stray { var: &'static str, word: String },
}

const AWS_VAR: &str = "EC2_BACKUP_FLAGS_AWS";

/// Launch options a user may set for the helper instance.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LaunchFlags {
    pub instance_type: Option<String>,
    pub key_name: Option<String>,
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
    /// An instance profile, by name or ARN (aws-cli accepts `Name=x`, `Arn=y` or a bare name).
    pub iam_instance_profile: Option<String>,
    pub image_id: Option<String>,
}

const AWS_FLAGS: &[&str] = &[
    "--instance-type",
    "--key-name",
    "--subnet-id",
    "--security-group-ids",
    "--iam-instance-profile",
    "--image-id",
];

impl LaunchFlags {
    /// Parses `EC2_BACKUP_FLAGS_AWS`. Accepts `--flag value` and `--flag=value`;
    /// `--security-group-ids` takes one or more IDs, as the AWS CLI does.
    pub fn parse(text: &str) -> Result<Self, FlagsError> {
        let words = shlex::split(text).ok_or(FlagsError::Unbalanced { var: AWS_VAR })?;
        let mut flags = LaunchFlags::default();
        let mut i = 0;
        while i < words.len() {
            let word = &words[i];
            i += 1;
            if !word.starts_with("--") {
                return Err(FlagsError::Stray {
                    var: AWS_VAR,
                    word: word.clone(),
                });
            }
            let (name, inline) = match word.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (word.as_str(), None),
            };
            if !AWS_FLAGS.contains(&name) {
                return Err(FlagsError::Unsupported {
                    var: AWS_VAR,
                    flag: name.to_string(),
                    supported: AWS_FLAGS.join(" "),
                });
            }
            let mut values = Vec::new();
            if let Some(v) = inline {
                values.push(v);
            }
            // Security groups take a list; every other flag takes exactly one value.
            while i < words.len()
                && !words[i].starts_with("--")
                && (values.is_empty() || name == "--security-group-ids")
            {
                values.push(words[i].clone());
                i += 1;
            }
            let values: Vec<String> = values
                .iter()
                .flat_map(|v| v.split(',').map(str::to_string))
                .filter(|v| !v.is_empty())
                .collect();
            let missing = || FlagsError::MissingValue {
                var: AWS_VAR,
                flag: name.to_string(),
            };
            let repeated = || FlagsError::Repeated {
                var: AWS_VAR,
                flag: name.to_string(),
            };
            if values.is_empty() {
                return Err(missing());
            }
            let single = |slot: &mut Option<String>| -> Result<(), FlagsError> {
                if slot.is_some() || values.len() != 1 {
                    return Err(if slot.is_some() {
                        repeated()
                    } else {
                        FlagsError::Stray {
                            var: AWS_VAR,
                            word: values[1].clone(),
                        }
                    });
                }
                *slot = Some(values[0].clone());
                Ok(())
            };
            match name {
                "--instance-type" => single(&mut flags.instance_type)?,
                "--key-name" => single(&mut flags.key_name)?,
                "--subnet-id" => single(&mut flags.subnet_id)?,
                "--image-id" => single(&mut flags.image_id)?,
                "--iam-instance-profile" => single(&mut flags.iam_instance_profile)?,
                _ => {
                    if !flags.security_group_ids.is_empty() {
                        return Err(repeated());
                    }
                    flags.security_group_ids = values;
                }
            }
        }
        Ok(flags)
    }
}

/// Extra words for every ssh invocation, with `~` expanded so that rsync's `-e` (which does
/// no expansion of its own) and ssh behave alike.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SshFlags {
    pub words: Vec<String>,
}

impl SshFlags {
    pub fn parse(text: &str, home: &Path) -> Result<Self, FlagsError> {
        let words = shlex::split(text).ok_or(FlagsError::Unbalanced {
            var: "EC2_BACKUP_FLAGS_SSH",
        })?;
        let words = words.into_iter().map(|w| expand_tilde(&w, home)).collect();
        Ok(SshFlags { words })
    }

    /// Identity files these flags name (`-i FILE`, `-iFILE`, `-o IdentityFile=FILE`).
    pub fn identities(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut it = self.words.iter();
        while let Some(w) = it.next() {
            if w == "-i" {
                if let Some(v) = it.next() {
                    found.push(PathBuf::from(v));
                }
            } else if let Some(v) = w.strip_prefix("-i") {
                found.push(PathBuf::from(v));
            } else if w == "-o" {
                if let Some(v) = it.next().and_then(|o| identity_option(o)) {
                    found.push(v);
                }
            } else if let Some(v) = w.strip_prefix("-o").and_then(identity_option) {
                found.push(v);
            }
        }
        found
    }
}

fn identity_option(option: &str) -> Option<PathBuf> {
    let (key, value) = option
        .split_once('=')
        .or_else(|| option.split_once(char::is_whitespace))?;
    key.trim()
        .eq_ignore_ascii_case("identityfile")
        .then(|| PathBuf::from(value.trim()))
}

/// Expands a leading `~` or `~/` in a word, and after `=` in `-oKey=~/x` forms.
fn expand_tilde(word: &str, home: &Path) -> String {
    let home = home.to_string_lossy();
    if word == "~" {
        return home.into_owned();
    }
    if let Some(rest) = word.strip_prefix("~/") {
        return format!("{home}/{rest}");
    }
    for prefix in ["-i", "-o"] {
        if let Some(rest) = word.strip_prefix(prefix) {
            if rest.starts_with('~') {
                return format!("{prefix}{}", expand_tilde(rest, Path::new(&*home)));
            }
        }
    }
    if let Some((key, value)) = word.split_once('=') {
        if value == "~" || value.starts_with("~/") {
            return format!("{key}={}", expand_tilde(value, Path::new(&*home)));
        }
    }
    word.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_flags_both_spellings() {
        let f = LaunchFlags::parse(
            "--instance-type t3.small --key-name=mine --security-group-ids sg-1 sg-2 --subnet-id subnet-9",
        )
        .unwrap();
        assert_eq!(f.instance_type.as_deref(), Some("t3.small"));
        assert_eq!(f.key_name.as_deref(), Some("mine"));
        assert_eq!(f.security_group_ids, vec!["sg-1", "sg-2"]);
        assert_eq!(f.subnet_id.as_deref(), Some("subnet-9"));
        assert_eq!(f.image_id, None);
    }

    #[test]
    fn aws_flags_comma_list_and_profile() {
        let f = LaunchFlags::parse(
            "--security-group-ids=sg-1,sg-2 --iam-instance-profile Name=backup --image-id ami-1",
        )
        .unwrap();
        assert_eq!(f.security_group_ids, vec!["sg-1", "sg-2"]);
        assert_eq!(f.iam_instance_profile.as_deref(), Some("Name=backup"));
        assert_eq!(f.image_id.as_deref(), Some("ami-1"));
    }

    #[test]
    fn aws_flags_errors() {
        assert!(matches!(
            LaunchFlags::parse("--count 3"),
            Err(FlagsError::Unsupported { ref flag, .. }) if flag == "--count"
        ));
        assert!(matches!(
            LaunchFlags::parse("--instance-type"),
            Err(FlagsError::MissingValue { .. })
        ));
        assert!(matches!(
            LaunchFlags::parse("--instance-type a b"),
            Err(FlagsError::Stray { ref word, .. }) if word == "b"
        ));
        assert!(matches!(
            LaunchFlags::parse("t3.micro"),
            Err(FlagsError::Stray { .. })
        ));
        assert!(matches!(
            LaunchFlags::parse("--key-name a --key-name b"),
            Err(FlagsError::Repeated { .. })
        ));
        assert!(matches!(
            LaunchFlags::parse("--key-name 'a"),
            Err(FlagsError::Unbalanced { .. })
        ));
        assert_eq!(LaunchFlags::parse("").unwrap(), LaunchFlags::default());
    }

    #[test]
    fn ssh_flags_expand_tilde_and_find_identities() {
        let home = Path::new("/home/u");
        let f = SshFlags::parse(
            "-i ~/.ssh/other -o 'IdentityFile=~/k 2' -i~/x -oIdentityFile=/abs -p 22",
            home,
        )
        .unwrap();
        assert_eq!(
            f.words,
            vec![
                "-i",
                "/home/u/.ssh/other",
                "-o",
                "IdentityFile=/home/u/k 2",
                "-i/home/u/x",
                "-oIdentityFile=/abs",
                "-p",
                "22"
            ]
        );
        assert_eq!(
            f.identities(),
            vec![
                PathBuf::from("/home/u/.ssh/other"),
                PathBuf::from("/home/u/k 2"),
                PathBuf::from("/home/u/x"),
                PathBuf::from("/abs"),
            ]
        );
    }
}
