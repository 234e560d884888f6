//! Remote configuration: the signed envelope an operator publishes, and its checks.
//!
//! An [`Envelope`] carries a new pipeline (`kind = "config"`: the TOML of `[[inputs]]`,
//! `[[stages]]` and `[output]`) or a change of the trusted keys (`kind = "keys"`), with a
//! version, a target, times, the signing key's id and an ed25519 signature over
//! [`Envelope::signed_bytes`]. [`Envelope::check`] verifies it against the trusted keys and
//! the gateway's state and says why it is refused; [`pipeline_config`] turns an accepted
//! config text into a full [`Config`] with the local bootstrap, validated.
//!
//! Signed bytes (all integers big-endian, each text as a u32 length and its UTF-8 bytes):
//! `"edge-gateway envelope v1"`, kind, target, version (u64), issued_at (i64 unix
//! seconds), not_after (i64, -1 when unset), key_id, payload (the config text; for keys,
//! the concatenation, each as a text, of `"add"`, id, public key per added key and
//! `"remove"`, id per removed one).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{Config, ConfigErrors, Input, Output, Stage};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// What an envelope carries.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A new pipeline.
    Config,
    /// A change of the trusted keys.
    Keys,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Config => "config",
            Kind::Keys => "keys",
        }
    }
}

/// A trusted public key.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    /// The key's id, named by envelopes it signs.
    pub id: String,
    /// The ed25519 public key, base64 (32 bytes).
    pub public_key: String,
}

/// A change of the trusted keys (`kind = "keys"`), signed by a key already trusted.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyChange {
    /// Keys to trust from now on.
    #[serde(default)]
    pub add: Vec<TrustedKey>,
    /// Key ids to trust no more.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// A signed, versioned configuration (or key) change.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Monotonic version: a gateway accepts only versions above the highest it accepted.
    pub version: u64,
    /// `<gateway id>` or `group:<group>`.
    pub target: String,
    /// When it was signed (RFC 3339).
    pub issued_at: String,
    /// Refused after this time (RFC 3339), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// `config` or `keys`.
    pub kind: Kind,
    /// The pipeline's TOML (`kind = "config"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// The key change (`kind = "keys"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<KeyChange>,
    /// The id of the key that signed it.
    pub key_id: String,
    /// ed25519 signature over [`Envelope::signed_bytes`], base64.
    pub signature: String,
}

/// Why an envelope was refused. The running config is left as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// Not an envelope at all.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// Signed by a key this gateway does not trust.
    #[error("unknown key {0:?}")]
    UnknownKey(String),
    /// The signature does not match the contents and the key.
    #[error("bad signature (key {0:?})")]
    BadSignature(String),
    /// Not above the highest version accepted (anti-rollback).
    #[error("version {version} is not above the applied version {applied}")]
    OldVersion {
        /// The envelope's version.
        version: u64,
        /// The highest version this gateway accepted.
        applied: u64,
    },
    /// Past its `not_after`.
    #[error("expired at {0}")]
    Expired(String),
    /// For another gateway or group.
    #[error("target {0:?} is not this gateway or one of its groups")]
    WrongTarget(String),
    /// The config does not validate; every error, with its path.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Rejection {
    /// A short label for metrics and status reports.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::Malformed(_) => "malformed",
            Rejection::UnknownKey(_) => "unknown_key",
            Rejection::BadSignature(_) => "bad_signature",
            Rejection::OldVersion { .. } => "old_version",
            Rejection::Expired(_) => "expired",
            Rejection::WrongTarget(_) => "wrong_target",
            Rejection::Invalid(_) => "invalid_config",
        }
    }
}

fn put(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Unix seconds of an RFC 3339 time.
pub fn unix_seconds(rfc3339: &str) -> Result<i64, String> {
    let t = humantime::parse_rfc3339_weak(rfc3339)
        .map_err(|e| format!("{rfc3339:?} is not an RFC 3339 time: {e}"))?;
    Ok(match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    })
}

/// RFC 3339 text of a time.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl KeyChange {
    /// The signed payload of a key change: each added key as `"add"`, id, public key, each
    /// removed id as `"remove"`, id, every one length-prefixed (so no id or key can
    /// pass for another entry).
    fn signed_payload(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for k in &self.add {
            put(&mut out, "add");
            put(&mut out, &k.id);
            put(&mut out, &k.public_key);
        }
        for id in &self.remove {
            put(&mut out, "remove");
            put(&mut out, id);
        }
        out
    }

    /// The trusted keys after this change to `keys`: every added key must be a valid
    /// ed25519 key with an id of letters, digits, `.`, `_` or `-`, and at least one key
    /// must remain.
    pub fn apply_to(&self, keys: &[TrustedKey]) -> Result<Vec<TrustedKey>, String> {
        for k in &self.add {
            let id_ok = !k.id.is_empty()
                && k.id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !id_ok {
                return Err(format!("key id {:?}: letters, digits, '.', '_', '-'", k.id));
            }
        }
        verifying_keys(&self.add)?;
        let mut next: Vec<TrustedKey> = keys
            .iter()
            .filter(|k| !self.remove.contains(&k.id) && !self.add.iter().any(|a| a.id == k.id))
            .cloned()
            .collect();
        next.extend(self.add.iter().cloned());
        if next.is_empty() {
            return Err("the change would leave no trusted key".into());
        }
        Ok(next)
    }
}

impl Envelope {
    /// The bytes the signature covers (see the module docs).
    pub fn signed_bytes(&self) -> Result<Vec<u8>, Rejection> {
        let issued = unix_seconds(&self.issued_at).map_err(Rejection::Malformed)?;
        let not_after = match &self.not_after {
            Some(t) => unix_seconds(t).map_err(Rejection::Malformed)?,
            None => -1,
        };
        let payload = match (self.kind, &self.config, &self.keys) {
            (Kind::Config, Some(text), None) => text.as_bytes().to_vec(),
            (Kind::Keys, None, Some(k)) => k.signed_payload(),
            _ => {
                return Err(Rejection::Malformed(
                    "a config envelope carries `config`, a keys envelope `keys`".into(),
                ))
            }
        };
        let mut out = Vec::with_capacity(payload.len() + 128);
        put(&mut out, "edge-gateway envelope v1");
        put(&mut out, self.kind.as_str());
        put(&mut out, &self.target);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&issued.to_be_bytes());
        out.extend_from_slice(&not_after.to_be_bytes());
        put(&mut out, &self.key_id);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Signs the envelope with `key` (sets `signature`).
    pub fn sign(&mut self, key: &SigningKey) -> Result<(), Rejection> {
        let sig = key.sign(&self.signed_bytes()?);
        self.signature = B64.encode(sig.to_bytes());
        Ok(())
    }

    /// Checks the envelope for this gateway, in the order a gateway reports: shape,
    /// key, signature, target, expiry, version. `applied` is the highest version accepted
    /// so far; `now` the gateway's clock.
    pub fn check(
        &self,
        keys: &BTreeMap<String, VerifyingKey>,
        gateway_id: &str,
        groups: &[String],
        applied: u64,
        now: SystemTime,
    ) -> Result<(), Rejection> {
        let bytes = self.signed_bytes()?;
        let key = keys
            .get(&self.key_id)
            .ok_or_else(|| Rejection::UnknownKey(self.key_id.clone()))?;
        let sig = B64
            .decode(self.signature.trim())
            .ok()
            .and_then(|b| Signature::from_slice(&b).ok())
            .ok_or_else(|| Rejection::BadSignature(self.key_id.clone()))?;
        // Strict: no small-order R, no weak key (the lax check takes a signature of
        // R = identity, s = 0 from a weak key for any message).
        key.verify_strict(&bytes, &sig)
            .map_err(|_| Rejection::BadSignature(self.key_id.clone()))?;
        let ours = self.target == gateway_id
            || self
                .target
                .strip_prefix("group:")
                .is_some_and(|g| groups.iter().any(|x| x == g));
        if !ours {
            return Err(Rejection::WrongTarget(self.target.clone()));
        }
        if let Some(t) = &self.not_after {
            let until = unix_seconds(t).map_err(Rejection::Malformed)?;
            let now_s = now
                .duration_since(UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs() as i64;
            if now_s > until {
                return Err(Rejection::Expired(t.clone()));
            }
        }
        if self.version <= applied {
            return Err(Rejection::OldVersion {
                version: self.version,
                applied,
            });
        }
        Ok(())
    }
}

/// The trusted keys as verifying keys; an unreadable key is an error naming it, and so
/// is a weak one (a point of small order, such as all zeros or the identity: a
/// placeholder anyone could sign for).
pub fn verifying_keys(keys: &[TrustedKey]) -> Result<BTreeMap<String, VerifyingKey>, String> {
    keys.iter()
        .map(|k| {
            let bytes: [u8; 32] = B64
                .decode(k.public_key.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| format!("key {:?}: not 32 bytes of base64", k.id))?;
            let vk =
                VerifyingKey::from_bytes(&bytes).map_err(|e| format!("key {:?}: {e}", k.id))?;
            if vk.is_weak() {
                return Err(format!(
                    "key {:?}: a weak key (a point of small order), for which anyone can make a valid signature; use a public key printed by `gateway remote keygen`",
                    k.id
                ));
            }
            Ok((k.id.clone(), vk))
        })
        .collect()
}

/// A new signing key from 32 random bytes (the caller's randomness).
pub fn signing_key(secret: [u8; 32]) -> SigningKey {
    SigningKey::from_bytes(&secret)
}

/// A signing key's file: its 32-byte secret, base64, one line.
pub fn encode_signing_key(key: &SigningKey) -> String {
    format!("{}\n", B64.encode(key.to_bytes()))
}

/// Reads a signing key file written by [`encode_signing_key`].
pub fn read_signing_key(path: &Path) -> Result<SigningKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let bytes: [u8; 32] = B64
        .decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("{}: not a signing key (32 bytes, base64)", path.display()))?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// A public key, base64, as `trusted_keys` lists it.
pub fn public_key(key: &SigningKey) -> String {
    B64.encode(key.verifying_key().to_bytes())
}

/// The pipeline part of a config file: what an envelope may replace.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineDoc {
    /// The inputs.
    #[serde(default)]
    pub inputs: Vec<Input>,
    /// The global stages.
    #[serde(default)]
    pub stages: Vec<Stage>,
    /// The output.
    pub output: Output,
}

/// A full config: `local`'s bootstrap (gateway, spool, telemetry, control) with the
/// pipeline of `text`, validated; every error with its path.
pub fn pipeline_config(local: &Config, text: &str) -> Result<Config, ConfigErrors> {
    let doc: PipelineDoc = toml::from_str(text).map_err(|e| {
        crate::input_error(text, None).unwrap_or_else(|| crate::syntax_error(&e, text, None))
    })?;
    let mut c = local.clone();
    c.inputs = doc.inputs;
    c.stages = doc.stages;
    c.output = doc.output;
    crate::checked(c, None, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        signing_key([n; 32])
    }

    fn envelope(version: u64, target: &str) -> Envelope {
        let mut e = Envelope {
            version,
            target: target.into(),
            issued_at: "2026-11-26T12:00:00Z".into(),
            not_after: None,
            kind: Kind::Config,
            config: Some("[output.kafka]\nbrokers = \"k:9092\"\n".into()),
            keys: None,
            key_id: "ops".into(),
            signature: String::new(),
        };
        e.sign(&key(1)).expect("signs");
        e
    }

    fn trusted() -> BTreeMap<String, VerifyingKey> {
        verifying_keys(&[TrustedKey {
            id: "ops".into(),
            public_key: public_key(&key(1)),
        }])
        .expect("keys")
    }

    fn check(e: &Envelope, applied: u64) -> Result<(), &'static str> {
        let now = humantime::parse_rfc3339("2026-11-26T13:00:00Z").expect("time");
        e.check(&trusted(), "gw-1", &["plant".into()], applied, now)
            .map_err(|r| r.label())
    }

    #[test]
    fn each_rejection_has_its_reason() {
        assert_eq!(check(&envelope(2, "gw-1"), 1), Ok(()));
        assert_eq!(check(&envelope(2, "group:plant"), 1), Ok(()));
        assert_eq!(check(&envelope(2, "gw-2"), 1), Err("wrong_target"));
        assert_eq!(check(&envelope(2, "gw-1"), 2), Err("old_version"));
        let mut tampered = envelope(2, "gw-1");
        tampered.config = Some("[output.kafka]\nbrokers = \"evil:9092\"\n".into());
        assert_eq!(check(&tampered, 1), Err("bad_signature"));
        let mut retargeted = envelope(2, "gw-2");
        retargeted.target = "gw-1".into();
        assert_eq!(
            check(&retargeted, 1),
            Err("bad_signature"),
            "the target is signed"
        );
        let mut other = envelope(2, "gw-1");
        other.key_id = "nobody".into();
        assert_eq!(check(&other, 1), Err("unknown_key"));
        let mut wrong_key = envelope(2, "gw-1");
        wrong_key.sign(&key(2)).expect("signs");
        assert_eq!(check(&wrong_key, 1), Err("bad_signature"));
        let mut expired = envelope(2, "gw-1");
        expired.not_after = Some("2026-11-26T12:30:00Z".into());
        expired.sign(&key(1)).expect("signs");
        assert_eq!(check(&expired, 1), Err("expired"));
    }

    #[test]
    fn a_weak_key_is_refused_and_its_forgery_does_not_verify() {
        // The identity point and the all-zero encoding (order 4).
        let mut identity = [0u8; 32];
        identity[0] = 1;
        for weak in [identity, [0u8; 32]] {
            let k = TrustedKey {
                id: "placeholder".into(),
                public_key: B64.encode(weak),
            };
            let e = verifying_keys(std::slice::from_ref(&k)).expect_err("weak key refused");
            assert!(e.contains("weak key"), "{e}");
            // Were it trusted, the forgery (R = identity, s = 0) would pass the lax check.
            let vk = VerifyingKey::from_bytes(&weak).expect("decodes");
            let mut forged = envelope(2, "gw-1");
            forged.key_id = "placeholder".into();
            let mut sig = [0u8; 64];
            sig[0] = 1;
            forged.signature = B64.encode(sig);
            let keys = BTreeMap::from([("placeholder".to_string(), vk)]);
            let now = humantime::parse_rfc3339("2026-11-26T13:00:00Z").expect("time");
            let bytes = forged.signed_bytes().expect("bytes");
            if weak == identity {
                use ed25519_dalek::Verifier;
                assert!(
                    vk.verify(&bytes, &Signature::from_bytes(&sig)).is_ok(),
                    "the lax check takes it"
                );
            }
            assert_eq!(
                forged
                    .check(&keys, "gw-1", &[], 1, now)
                    .map_err(|r| r.label()),
                Err("bad_signature")
            );
        }
    }

    #[test]
    fn a_key_change_cannot_be_rewritten_into_another() {
        let change = |add: Vec<(&str, &str)>, remove: Vec<&str>| KeyChange {
            add: add
                .into_iter()
                .map(|(id, k)| TrustedKey {
                    id: id.into(),
                    public_key: k.into(),
                })
                .collect(),
            remove: remove.into_iter().map(String::from).collect(),
        };
        let k = public_key(&key(2));
        let honest = change(vec![("new", &k)], vec!["old"]);
        let forged_key = format!("{k}\nremove old");
        let forged = change(vec![("new", &forged_key)], vec![]);
        assert_ne!(honest.signed_payload(), forged.signed_payload());
        // Applying checks every key and keeps one at least.
        let keys = vec![TrustedKey {
            id: "old".into(),
            public_key: public_key(&key(1)),
        }];
        assert!(forged.apply_to(&keys).is_err());
        assert_eq!(honest.apply_to(&keys).expect("applies").len(), 1);
        assert!(
            change(vec![], vec!["old"]).apply_to(&keys).is_err(),
            "none left"
        );
    }

    #[test]
    fn signed_bytes_are_pinned() {
        let e = envelope(7, "gw-1");
        let b = e.signed_bytes().expect("bytes");
        assert_eq!(&b[..4], &24u32.to_be_bytes());
        assert_eq!(&b[4..28], b"edge-gateway envelope v1");
        assert_eq!(&b[28..32], &6u32.to_be_bytes());
        assert_eq!(&b[32..38], b"config");
        let text = e.config.as_deref().expect("config").as_bytes();
        // header, kind, target, version, issued_at, not_after, key_id, payload
        assert_eq!(b.len(), 28 + 10 + 8 + 8 + 8 + 8 + 7 + 4 + text.len());
        assert_eq!(&b[b.len() - text.len()..], text);
        assert_eq!(&b[46..54], &7u64.to_be_bytes());
    }
}
