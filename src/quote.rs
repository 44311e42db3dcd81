//! The one place where words become a command line for a shell on the helper.
//!
//! ssh joins its arguments with spaces and hands the result to the login shell on the helper,
//! so every remote command goes through [`remote_command`], which quotes each word for a POSIX
//! shell. rsync's `-e` option is split by rsync itself (spaces separate words, single or double
//! quotes group them, backslashes are literal), so it has its own quoting, [`rsh_word`].

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum QuoteError {
    #[error("the word {0:?} contains a NUL byte and cannot be passed to a remote command")]
    Nul(String),
    #[error("the ssh flag {0:?} contains both kinds of quote, which rsync cannot pass to ssh")]
    BothQuotes(String),
}

/// Quotes `words` into one string that a POSIX shell splits back into exactly these words.
pub fn remote_command<S: AsRef<str>>(words: &[S]) -> Result<String, QuoteError> {
    let quoted: Result<Vec<_>, _> = words
        .iter()
        .map(|w| {
            let w = w.as_ref();
            shlex::try_quote(w)
                .map(|q| q.into_owned())
                .map_err(|_| QuoteError::Nul(w.to_string()))
        })
        .collect();
    Ok(quoted?.join(" "))
}

/// Quotes one word for rsync's own splitting of its `-e` command.
pub fn rsh_word(word: &str) -> Result<String, QuoteError> {
    if word.contains('\0') {
        return Err(QuoteError::Nul(word.to_string()));
    }
    let plain = !word.is_empty() && !word.contains([' ', '\t', '\n', '\'', '"']);
    if plain {
        Ok(word.to_string())
    } else if !word.contains('\'') {
        Ok(format!("'{word}'"))
    } else if !word.contains('"') {
        Ok(format!("\"{word}\""))
    } else {
        Err(QuoteError::BothQuotes(word.to_string()))
    }
}

/// A path as one printable line: C-style escapes for a backslash, control bytes and bytes
/// that are not printable ASCII (`\n`, `\t`, `\ooo`), so that no name can forge a line of
/// its own in line-based output.
pub fn c_escape(path: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for &b in path.as_os_str().as_bytes() {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b:03o}")),
        }
    }
    out
}

/// A path as an rsync filter pattern that matches exactly it. rsync reads a backslash as an
/// escape only in a pattern that holds a wildcard (`*`, `?`, `[`), so the path is escaped
/// when it holds one, or when `wild` says the caller adds one (a trailing `/*`).
pub fn rsync_literal(path: &[u8], wild: bool) -> Vec<u8> {
    if !wild && !path.iter().any(|b| matches!(b, b'*' | b'?' | b'[')) {
        return path.to_vec();
    }
    let mut out = Vec::with_capacity(path.len() + 8);
    for &b in path {
        if matches!(b, b'*' | b'?' | b'[' | b']' | b'\\') {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_escape_keeps_every_name_on_one_line() {
        use std::os::unix::ffi::OsStrExt;
        let p = std::path::Path::new(std::ffi::OsStr::from_bytes(b"./a\nb\\c\xff d\x01"));
        assert_eq!(c_escape(p), "./a\\nb\\\\c\\377 d\\001");
        // What tar prints for a name, unescaped and escaped again, is what tar printed.
        let tar = "./a\\nb c\\\\d\\377";
        assert_eq!(c_escape(&crate::method::dd::unescape(tar)), tar);
    }
    use std::process::Command;

    /// The real proof: sh must split the quoted string back into the same words.
    #[test]
    fn remote_command_round_trips_through_sh() {
        let words = [
            "printf",
            "%s\\n",
            "plain",
            "with space",
            "it's",
            "\"dq\"",
            "$(touch /tmp/ec2-backup-pwned)",
            "`id`",
            "a;b|c&d",
            "new\nline",
            "-leading",
            "*",
            "~",
            "",
        ];
        let script = remote_command(&words).unwrap();
        let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let expected: String = words[2..].iter().map(|w| format!("{w}\n")).collect();
        assert_eq!(text, expected);
        assert!(!std::path::Path::new("/tmp/ec2-backup-pwned").exists());
    }

    #[test]
    fn remote_command_rejects_nul() {
        assert!(matches!(remote_command(&["a\0b"]), Err(QuoteError::Nul(_))));
    }

    #[test]
    fn rsh_words() {
        assert_eq!(rsh_word("-i").unwrap(), "-i");
        assert_eq!(rsh_word("/a b/key").unwrap(), "'/a b/key'");
        assert_eq!(rsh_word("it's").unwrap(), "\"it's\"");
        assert_eq!(rsh_word("").unwrap(), "''");
        assert!(rsh_word("'\"").is_err());
    }

    #[test]
    fn rsync_literals_escape_only_where_rsync_reads_escapes() {
        assert_eq!(rsync_literal(b"back\\slash", false), b"back\\slash");
        assert_eq!(rsync_literal(b"a*b\\", false), b"a\\*b\\\\");
        assert_eq!(rsync_literal(b"back\\slash", true), b"back\\\\slash");
        assert_eq!(rsync_literal(b"q[1]", false), b"q\\[1\\]");
    }
}
