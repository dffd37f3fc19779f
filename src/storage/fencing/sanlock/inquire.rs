//! Parsing of the resource strings sanlock hands out (`sanlock_inquire`'s
//! state, `sanlock client inquire`, `sanlock_res_to_str`):
//!
//! ```text
//! STATE    = RESOURCE *(" " RESOURCE)
//! RESOURCE = lockspace ":" name 1*(":" path ":" offset) ":" lver [":SH"]
//! ```
//!
//! sanlock escapes `:` (and blkshim also accepts any `\x`) inside paths.
//! The string comes from another process over a socket, so it is untrusted:
//! anything malformed is an error, never a panic (fuzzed by
//! `fuzz/fuzz_targets/sanlock_inquire.rs`), and blkshim decides nothing
//! from a resource it could not parse.

use super::plan::{NAME_LEN, PATH_LEN};

/// One leased resource as sanlock reported it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeldResource {
    pub lockspace: String,
    pub name: String,
    /// (path, offset) of each disk of the lease.
    pub disks: Vec<(String, u64)>,
    pub lver: u64,
    pub shared: bool,
}

/// Split `s` at every unescaped `sep`, unescaping `\x` to `x`.
fn split_escaped(s: &str, sep: char) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some(e) => cur.push(e),
                None => return Err("dangling '\\' at the end".to_string()),
            }
        } else if c == sep {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    Ok(out)
}

/// Split a state string into its resources (at unescaped spaces), keeping
/// escapes for [`parse_resource`].
fn split_state(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let bytes = s.as_bytes();
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if i + 1 >= bytes.len() => return Err("dangling '\\' at the end".to_string()),
            b'\\' => i += 2,
            b' ' => {
                if i > start {
                    out.push(&s[start..i]);
                }
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    if start < bytes.len() {
        out.push(&s[start..]);
    }
    Ok(out)
}

fn number(field: &str, what: &str) -> Result<u64, String> {
    if field.is_empty() || !field.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{what} {field:?} is not a decimal number"));
    }
    field
        .parse::<u64>()
        .map_err(|e| format!("{what} {field:?}: {e}"))
}

/// Parse one `lockspace:name:path:offset[:path:offset...]:lver[:SH]`.
pub fn parse_resource(s: &str) -> Result<HeldResource, String> {
    let mut f = split_escaped(s, ':')?;
    let shared = f.last().map(|l| l == "SH").unwrap_or(false);
    if shared {
        f.pop();
    }
    // lockspace, name, ≥ 1 (path, offset), lver.
    if f.len() < 5 || (f.len() - 3) % 2 != 0 {
        return Err(format!(
            "resource {s:?} has {} fields, not lockspace:name:(path:offset)+:lver",
            f.len()
        ));
    }
    let (lockspace, name) = (f[0].clone(), f[1].clone());
    for (what, v) in [("lockspace", &lockspace), ("resource name", &name)] {
        if v.is_empty() || v.len() > NAME_LEN {
            return Err(format!("{what} {v:?} is empty or longer than {NAME_LEN}"));
        }
    }
    let lver = number(&f[f.len() - 1], "lver")?;
    let mut disks = Vec::new();
    for pair in f[2..f.len() - 1].chunks(2) {
        let path = pair[0].clone();
        if path.is_empty() || path.len() >= PATH_LEN {
            return Err(format!("disk path {path:?} is empty or too long"));
        }
        disks.push((path, number(&pair[1], "disk offset")?));
    }
    if disks.len() > 4 {
        return Err(format!("{} disks (sanlock allows 4)", disks.len()));
    }
    Ok(HeldResource {
        lockspace,
        name,
        disks,
        lver,
        shared,
    })
}

/// Parse a whole inquire state (any number of resources; empty = none).
pub fn parse_state(s: &str) -> Result<Vec<HeldResource>, String> {
    split_state(s.trim_end_matches(['\n', '\0']))?
        .into_iter()
        .map(parse_resource)
        .collect()
}

/// Fuzzing entry point: arbitrary bytes through the parsers. Must never
/// panic; a parsed resource must satisfy the bounds the parser promises.
pub fn fuzz_inquire_input(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    if let Ok(all) = parse_state(&s) {
        for r in all {
            assert!(!r.disks.is_empty() && r.disks.len() <= 4);
            assert!(r.lockspace.len() <= NAME_LEN && r.name.len() <= NAME_LEN);
        }
    }
    let _ = parse_resource(&s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_resource() {
        let r = parse_resource("blkshim:vm1:/dev/mapper/leaseA:1048576:7").unwrap();
        assert_eq!(r.lockspace, "blkshim");
        assert_eq!(r.name, "vm1");
        assert_eq!(r.disks, vec![("/dev/mapper/leaseA".to_string(), 1 << 20)]);
        assert_eq!(r.lver, 7);
        assert!(!r.shared);
    }

    #[test]
    fn escapes_shared_and_several() {
        let st = "ls:a:/dev/x\\:y:0:3 ls:b:/p:1048576:/q:0:12:SH\n";
        let all = parse_state(st).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].disks[0].0, "/dev/x:y");
        assert_eq!(all[0].lver, 3);
        assert_eq!(all[1].disks.len(), 2);
        assert!(all[1].shared);
        assert_eq!(all[1].lver, 12);
        assert_eq!(parse_state("").unwrap(), vec![]);
        let sp = parse_state("ls:a:/dev/with\\ space:0:1").unwrap();
        assert_eq!(sp[0].disks[0].0, "/dev/with space");
    }

    #[test]
    fn malformed() {
        for bad in [
            "ls:a:/p:0",
            "ls:a:/p:x:1",
            "ls:a:/p:0:-1",
            "ls:a:/p:0:1:2",
            ":a:/p:0:1",
            "ls:a::0:1",
            "ls:a:/p:0:99999999999999999999",
            "ls:a:/p:0:1\\",
            "ls:a:/a:0:/b:0:/c:0:/d:0:/e:0:1",
        ] {
            assert!(parse_resource(bad).is_err(), "{bad}");
        }
        assert!(parse_state("ls:a:/p:0:1 \\").is_err());
        fuzz_inquire_input(b"\\");
        fuzz_inquire_input(&[0xff, b':', b'\\', 0xc3]);
    }
}
