//! The helper's cloud-config: its host key (so the tool can pin it before connecting) and any
//! extra public keys allowed to log in. JSON is valid YAML, so the document is written with a
//! JSON serializer and needs no hand-made escaping.

use std::time::Duration;

use serde_json::json;

/// Where the run's heartbeats land on the helper (a tmpfs: gone at power-off).
pub const HEARTBEAT: &str = "/run/ec2-backup/heartbeat";

/// The dead-man switch, armed at boot (cloud-init's bootcmd, as root, before sshd): powers
/// the helper off once the heartbeat file is `$1` seconds old. The file is made at boot, so
/// a run killed while the helper boots is covered too. The launch asks for shutdown behaviour
/// `terminate`, so power-off terminates the helper, and with it the run's own volume (marked
/// DeleteOnTermination while attached). Under systemd the loop runs as a unit of its own
/// (cloud-init's may be cleaned up); elsewhere in the background.
const WATCHDOG: &str = r#"limit=$1 hb=/run/ec2-backup/heartbeat
mkdir -p /run/ec2-backup && touch "$hb"
loop='while sleep 1; do
  age=$(( $(date +%s) - $(stat -c %Y "$0" 2>/dev/null || echo 0) ))
  if [ "$age" -ge "$1" ]; then poweroff || shutdown -h now || halt -p; exit 0; fi
done'
if command -v systemd-run >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemd-run --quiet --unit=ec2-backup-watchdog sh -c "$loop" "$hb" "$limit"
else
  sh -c "$loop" "$hb" "$limit" </dev/null >/dev/null 2>&1 &
fi
"#;

/// The helper's cloud-config: host key, extra authorized keys, and the watchdog that powers it
/// off `watchdog` after the last heartbeat.
pub fn cloud_config(
    host_private: &str,
    host_public: &str,
    authorized: &[String],
    watchdog: Duration,
) -> String {
    let doc = json!({
        "bootcmd": [["sh", "-c", WATCHDOG, "ec2-backup-watchdog", watchdog.as_secs().to_string()]],
        "ssh_deletekeys": true,
        "ssh_genkeytypes": [],
        "ssh_keys": {
            "ed25519_private": host_private,
            "ed25519_public": host_public,
        },
        "ssh_authorized_keys": authorized,
    });
    format!("#cloud-config\n{doc}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_config_is_json_after_the_header() {
        let text = cloud_config(
            "PRIV\nKEY\n",
            "ssh-ed25519 AAA h",
            &["ssh-rsa B u".into()],
            Duration::from_secs(30),
        );
        let (head, body) = text.split_once('\n').unwrap();
        assert_eq!(head, "#cloud-config");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["ssh_keys"]["ed25519_private"], "PRIV\nKEY\n");
        assert_eq!(v["ssh_authorized_keys"][0], "ssh-rsa B u");
        assert_eq!(v["bootcmd"][0][4], "30");
    }

    /// The watchdog itself, run by sh here with its power-off replaced: it fires once the
    /// heartbeat is older than the limit, and not while heartbeats come.
    #[test]
    fn watchdog_powers_off_only_when_heartbeats_stop() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let marker = dir.path().join("powered-off");
        let shim = format!("#!/bin/sh\ntouch '{}'\n", marker.display());
        std::fs::write(bin.join("poweroff"), shim).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(bin.join("poweroff"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let hb = dir.path().join("hb");
        // Never the systemd branch here: its unit would not see the shim on PATH.
        let systemd = "command -v systemd-run >/dev/null 2>&1";
        assert!(WATCHDOG.contains(systemd));
        let script = WATCHDOG
            .replace(systemd, "false")
            .replace("/run/ec2-backup/heartbeat", &hb.display().to_string())
            .replace("mkdir -p /run/ec2-backup", "true");
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        let st = std::process::Command::new("sh")
            .args(["-c", &script, "watchdog", "3"])
            .env("PATH", &path)
            .status()
            .unwrap();
        assert!(st.success());
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(800));
            std::fs::File::options()
                .write(true)
                .open(&hb)
                .unwrap()
                .set_modified(std::time::SystemTime::now())
                .unwrap();
        }
        assert!(!marker.exists(), "fired while heartbeats came");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !marker.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(marker.exists(), "did not fire once heartbeats stopped");
    }
}
