//! The helper's cloud-config: its host key (so the tool can pin it before connecting) and any
//! extra public keys allowed to log in. JSON is valid YAML, so the document is written with a
//! JSON serializer and needs no hand-made escaping.

use serde_json::json;

pub fn cloud_config(host_private: &str, host_public: &str, authorized: &[String]) -> String {
    let doc = json!({
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
        let text = cloud_config("PRIV\nKEY\n", "ssh-ed25519 AAA h", &["ssh-rsa B u".into()]);
        let (head, body) = text.split_once('\n').unwrap();
        assert_eq!(head, "#cloud-config");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["ssh_keys"]["ed25519_private"], "PRIV\nKEY\n");
        assert_eq!(v["ssh_authorized_keys"][0], "ssh-rsa B u");
    }
}
