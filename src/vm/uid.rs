//! The VM's uid: the MicroVM's Kubernetes uid, checked once where it enters (the wire, the
//! state directory) and trusted everywhere after, since it names directories, taps and files.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The longest uid accepted (a Kubernetes uid is a 36-character UUID).
const MAX_LEN: usize = 64;

/// A uid that cannot name a VM.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("VM uid {uid:?} must be 1-{MAX_LEN} letters, digits, '-', '_' or '.'")]
pub struct InvalidUid {
    pub(crate) uid: String,
}

/// A VM's uid: 1 to 64 ASCII letters, digits, `-`, `_` or `.`, and never `.` or `..`, so it
/// can be a file name as is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmUid(String);

impl VmUid {
    /// Check `uid`.
    pub fn new(uid: impl Into<String>) -> Result<Self, InvalidUid> {
        let uid = uid.into();
        let valid = !uid.is_empty()
            && uid.len() <= MAX_LEN
            && uid != "."
            && uid != ".."
            && uid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if valid {
            Ok(VmUid(uid))
        } else {
            Err(InvalidUid { uid })
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The uid a template's hash is taken with: the same for every VM.
    pub(crate) fn template() -> Self {
        VmUid("template".to_string())
    }
}

impl std::fmt::Display for VmUid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for VmUid {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for VmUid {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VmUid {
    type Error = InvalidUid;

    fn try_from(uid: String) -> Result<Self, Self::Error> {
        VmUid::new(uid)
    }
}

impl From<VmUid> for String {
    fn from(uid: VmUid) -> Self {
        uid.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_that_could_escape_a_directory_are_refused() {
        assert!(VmUid::new("4f1c2a3e-0000-4000-8000-000000000001").is_ok());
        for bad in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(VmUid::new(bad).is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<VmUid>("\"../x\"").is_err());
        let uid: VmUid = serde_json::from_str("\"vm-1\"").expect("valid");
        assert_eq!(uid.as_str(), "vm-1");
    }
}
