//! Finding the attached volume on the helper, whatever the device naming: Nitro instances show
//! EBS volumes as NVMe namespaces whose serial is the volume ID (udev links them under
//! /dev/disk/by-id), Xen instances as /dev/xvdX for a requested /dev/sdX, and some images keep
//! /dev/sdX itself. The script polls with short intervals until the device appears, then
//! refuses a device that is mounted or whose size is not the volume's (never write to the
//! wrong disk).

/// POSIX sh; arguments: volume ID without its dash, the requested device's letter, the
/// volume's size in bytes, the number of 0.2 s polls to wait.
const SCRIPT: &str = r#"set -u
vol=$1 letter=$2 want=$3 tries=$4
find_dev() {
  for d in "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_$vol" \
           "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_${vol}_1" \
           "/dev/xvd$letter" "/dev/sd$letter"; do
    if [ -b "$d" ]; then readlink -f -- "$d"; return 0; fi
  done
  for s in /sys/block/nvme*/device/serial; do
    [ -r "$s" ] || continue
    if [ "$(tr -d ' ' < "$s")" = "$vol" ]; then
      b=${s%/device/serial}; b=${b##*/}
      [ -b "/dev/${b}n1" ] && { echo "/dev/${b}n1"; return 0; }
      [ -b "/dev/$b" ] && { echo "/dev/$b"; return 0; }
    fi
  done
  return 1
}
i=0
until dev=$(find_dev); do
  i=$((i+1))
  if [ "$i" -ge "$tries" ]; then echo "no block device for $vol appeared" >&2; exit 3; fi
  sleep 0.2
done
if grep -q "^$dev " /proc/mounts; then echo "$dev is mounted already" >&2; exit 4; fi
size=$(blockdev --getsize64 "$dev")
if [ "$size" != "$want" ]; then
  echo "$dev has $size bytes, not the $want of the volume" >&2; exit 5
fi
echo "$dev"
"#;

/// The remote command (as words) that prints the device path of `volume_id`.
pub fn find_command(volume_id: &str, requested: &str, size_gib: i32, polls: u32) -> Vec<String> {
    let letter = requested.chars().last().unwrap_or('f').to_string();
    let bytes = u64::try_from(size_gib).unwrap_or(0) << 30;
    vec![
        "sudo".into(),
        "-n".into(),
        "sh".into(),
        "-c".into(),
        SCRIPT.into(),
        "find-device".into(),
        volume_id.replace('-', ""),
        letter,
        bytes.to_string(),
        polls.to_string(),
    ]
}

/// The device path from the script's output, checked to be a plain /dev path.
pub fn parse_found(output: &str) -> Option<String> {
    let dev = output.lines().rev().find(|l| !l.trim().is_empty())?.trim();
    let plain = dev.starts_with("/dev/")
        && dev[5..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '.'));
    plain.then(|| dev.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn command_words() {
        let w = find_command("vol-0abc", "/dev/sdf", 2, 50);
        assert_eq!(&w[6..], ["vol0abc", "f", "2147483648", "50"]);
    }

    #[test]
    fn parses_only_plain_device_paths() {
        assert_eq!(
            parse_found("/dev/nvme1n1\n").as_deref(),
            Some("/dev/nvme1n1")
        );
        assert_eq!(
            parse_found("noise\n/dev/xvdf\n").as_deref(),
            Some("/dev/xvdf")
        );
        assert_eq!(parse_found("/dev/x; rm -rf /"), None);
        assert_eq!(parse_found("sda"), None);
        assert_eq!(parse_found(""), None);
    }

    /// The script itself, run by sh on this machine: with no such device it must give up
    /// after its polls with exit 3 and a message.
    #[test]
    fn script_gives_up_when_no_device_appears() {
        let w = find_command("vol-0000000000000dead", "/dev/sdz", 1, 2);
        let out = Command::new("sh").args(&w[3..]).output().unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert!(String::from_utf8_lossy(&out.stderr).contains("no block device"));
    }
}
