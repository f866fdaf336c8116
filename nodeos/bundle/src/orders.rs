//! Signed orders: what in a sync reply makes a node act (download versions, activate,
//! confirm) or changes its settings (the report interval) is signed by the controller's
//! signing key, the same ed25519 key that signs bundles and whose public half every node holds.
//! The management tunnel authenticates the controller's *address*; this authenticates its
//! *word*, so whoever takes over the address cannot give orders.
//!
//! A [`SignedReply`] carries a [`ReplyBody`] as exact JSON text and a signature over a fixed
//! domain prefix plus that text (so a reply signature can never pass as a bundle manifest's,
//! nor the reverse). The body names the node and echoes the nonce of the report it answers,
//! so a reply recorded earlier (or for another node) cannot be replayed. [`open_reply`] checks
//! all of it and every bound; [`judge_order`] decides whether an order is new for the node.
//!
//! Sequence numbers: the controller numbers each node's activations (`tlm activate`) from a
//! counter kept in `effective/activation.toml` (in git), never above [`MAX_ORDER_SEQ`]. A node
//! carries out an order once: only a seq above the last one it accepted from a signed reply,
//! and no more than [`MAX_ORDER_STEP`] above it. Pure: no I/O.

use std::ops::RangeInclusive;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _};
use serde::{Deserialize, Serialize};

use crate::messages::Order;

/// What the controller's signature covers before the body text.
const DOMAIN: &[u8] = b"towalink sync reply v1\n";
/// Highest order sequence number (2^53 - 1: exact in JSON numbers everywhere, in TOML's i64,
/// and room for a controller that counts one a second for 285 million years).
pub const MAX_ORDER_SEQ: u64 = (1 << 53) - 1;
/// Largest step from the last accepted order to a new one.
pub const MAX_ORDER_STEP: u64 = 1 << 20;
/// The report interval a node accepts (the controller's `mgmt_report_interval_s` range).
pub const REPORT_INTERVAL_S: RangeInclusive<u64> = 1..=300;
/// Longest confirm timer an order may set (7 days).
pub const MAX_CONFIRM_S: u64 = 7 * 24 * 3600;
/// Most versions a reply may offer.
pub const MAX_OFFERED_VERSIONS: usize = 64;

/// What a sync reply tells the node, signed as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyBody {
    /// The node this reply is for.
    pub node_id: u32,
    /// The nonce of the report this answers.
    pub nonce: String,
    /// The versions the controller has for this node, oldest first (at most the newest few).
    pub versions: Vec<u32>,
    /// The latest activation order.
    pub order: Option<Order>,
    /// How long the node waits before its next sync when nothing happens.
    pub report_interval_s: u64,
    /// The node's recovery token, when the node reported holding another one (`tlm rotate
    /// recovery-token`). It travels inside the management link's WireGuard encryption, signed
    /// with the rest for this node and report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_token: Option<String>,
    /// The node's current WireGuard private key (base64), when the node reported not holding
    /// it (`tlm rotate node`): the node keeps it beside its other keys and uses it once a
    /// version names its public half. Travels like [`ReplyBody::recovery_token`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wg_private_key: Option<String>,
}

/// A [`ReplyBody`]'s exact JSON text and the controller's signature (base64) over it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReply {
    pub body: String,
    pub signature: String,
}

/// Why a sync reply was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply is not signed (a controller before signed orders, or not the controller)")]
    Unsigned,
    #[error("reply signature is not base64 ed25519")]
    SignatureFormat,
    #[error("reply signature does not verify against the controller key this node trusts")]
    BadSignature,
    #[error("signed reply body is not valid: {0}")]
    Body(String),
    #[error("reply is for node id {found}, this node is {expected}")]
    WrongNode { expected: u32, found: u32 },
    #[error("reply answers another report (nonce mismatch): replayed or stale")]
    Nonce,
    #[error("report interval {0} s is outside {min}..={max} s", min = REPORT_INTERVAL_S.start(), max = REPORT_INTERVAL_S.end())]
    Interval(u64),
    #[error("reply offers {0} versions; at most {MAX_OFFERED_VERSIONS}")]
    TooManyVersions(usize),
    #[error("version 0 does not exist")]
    VersionZero,
    #[error("order seq {0} is outside 1..={MAX_ORDER_SEQ}")]
    SeqOutOfRange(u64),
    #[error(
        "order seq {seq} jumps more than {MAX_ORDER_STEP} past the last accepted order {last}"
    )]
    SeqJump { seq: u64, last: u64 },
    #[error("order confirm timer {0} s is outside 1..={MAX_CONFIRM_S} s")]
    Confirm(u64),
}

fn signed_message(body: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(DOMAIN.len() + body.len());
    message.extend_from_slice(DOMAIN);
    message.extend_from_slice(body.as_bytes());
    message
}

/// Signs a reply body (the controller's side).
pub fn sign_reply(body: &ReplyBody, key: &SigningKey) -> SignedReply {
    // A struct of integers, strings and vectors always serializes.
    let text = serde_json::to_string(body).unwrap_or_default();
    let signature = key.sign(&signed_message(&text));
    SignedReply {
        signature: BASE64.encode(signature.to_bytes()),
        body: text,
    }
}

/// Checks a signed reply for this node and the report it answers (`nonce`): signature,
/// node id, nonce, and every bound on its values. Returns the body only when all hold.
pub fn open_reply(
    signed: Option<&SignedReply>,
    key: &(impl crate::TrustedKeys + ?Sized),
    node_id: u32,
    nonce: &str,
) -> Result<ReplyBody, ReplyError> {
    let signed = signed.ok_or(ReplyError::Unsigned)?;
    let signature: [u8; 64] = BASE64
        .decode(signed.signature.trim())
        .map_err(|_| ReplyError::SignatureFormat)?
        .try_into()
        .map_err(|_| ReplyError::SignatureFormat)?;
    let signature = Signature::from_bytes(&signature);
    let message = signed_message(&signed.body);
    if !key
        .trusted()
        .iter()
        .any(|key| key.verify(&message, &signature).is_ok())
    {
        return Err(ReplyError::BadSignature);
    }
    let body: ReplyBody =
        serde_json::from_str(&signed.body).map_err(|e| ReplyError::Body(e.to_string()))?;
    if body.node_id != node_id {
        return Err(ReplyError::WrongNode {
            expected: node_id,
            found: body.node_id,
        });
    }
    if nonce.is_empty() || body.nonce != nonce {
        return Err(ReplyError::Nonce);
    }
    check_body(&body)?;
    Ok(body)
}

/// The bounds every value of a body must keep.
fn check_body(body: &ReplyBody) -> Result<(), ReplyError> {
    if !REPORT_INTERVAL_S.contains(&body.report_interval_s) {
        return Err(ReplyError::Interval(body.report_interval_s));
    }
    if body.versions.len() > MAX_OFFERED_VERSIONS {
        return Err(ReplyError::TooManyVersions(body.versions.len()));
    }
    if body.versions.contains(&0) {
        return Err(ReplyError::VersionZero);
    }
    if let Some(order) = &body.order {
        if order.seq == 0 || order.seq > MAX_ORDER_SEQ {
            return Err(ReplyError::SeqOutOfRange(order.seq));
        }
        if order.version == 0 {
            return Err(ReplyError::VersionZero);
        }
        if let Some(confirm) = order.confirm_s {
            if confirm == 0 || confirm > MAX_CONFIRM_S {
                return Err(ReplyError::Confirm(confirm));
            }
        }
    }
    Ok(())
}

/// The last order a node carried out, as far as sequence numbers go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastOrder {
    /// None carried out (a new node, or no record).
    None,
    /// Accepted from a signed reply: the floor for new orders.
    Signed { seq: u64 },
    /// Recorded before orders were signed (`last-order.toml` without `signed = true`): its
    /// seq came over an unauthenticated channel, so it is no floor (an attacker's huge seq
    /// must not wedge the node); it only stops the very same order from running twice.
    Legacy { seq: u64, version: u32 },
}

/// What a node does with an order from a verified reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderVerdict {
    /// Carry it out.
    New,
    /// Already carried out (or older than the last one): nothing to do.
    Done,
}

/// Whether an order (from a reply [`open_reply`] accepted) is new for the node. Pure.
pub fn judge_order(order: &Order, last: LastOrder) -> Result<OrderVerdict, ReplyError> {
    let floor = match last {
        LastOrder::None => 0,
        LastOrder::Signed { seq } => seq,
        LastOrder::Legacy { seq, version } => {
            if seq == order.seq && version == order.version {
                return Ok(OrderVerdict::Done);
            }
            0
        }
    };
    if order.seq <= floor {
        return Ok(OrderVerdict::Done);
    }
    if order.seq - floor > MAX_ORDER_STEP {
        return Err(ReplyError::SeqJump {
            seq: order.seq,
            last: floor,
        });
    }
    Ok(OrderVerdict::New)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn body(order: Option<(u64, u32)>) -> ReplyBody {
        ReplyBody {
            node_id: 7,
            nonce: "n1".into(),
            versions: vec![1, 2],
            order: order.map(|(seq, version)| Order {
                seq,
                version,
                confirm_s: None,
            }),
            report_interval_s: 5,
            recovery_token: None,
            wg_private_key: None,
        }
    }

    fn open(signed: &SignedReply) -> Result<ReplyBody, ReplyError> {
        open_reply(Some(signed), &key(1).verifying_key(), 7, "n1")
    }

    #[test]
    fn a_signed_reply_opens_for_its_node_and_report_only() {
        let good = body(Some((3, 2)));
        let signed = sign_reply(&good, &key(1));
        assert_eq!(open(&signed), Ok(good));
        assert_eq!(
            open_reply(Some(&signed), &key(1).verifying_key(), 8, "n1"),
            Err(ReplyError::WrongNode {
                expected: 8,
                found: 7
            })
        );
        // A reply recorded for an earlier report is refused.
        assert_eq!(
            open_reply(Some(&signed), &key(1).verifying_key(), 7, "n2"),
            Err(ReplyError::Nonce)
        );
        assert_eq!(
            open_reply(Some(&signed), &key(1).verifying_key(), 7, ""),
            Err(ReplyError::Nonce)
        );
    }

    #[test]
    fn unsigned_forged_and_tampered_replies_are_refused() {
        assert_eq!(
            open_reply(None, &key(1).verifying_key(), 7, "n1"),
            Err(ReplyError::Unsigned)
        );
        let foreign = sign_reply(&body(Some((3, 2))), &key(2));
        assert_eq!(open(&foreign), Err(ReplyError::BadSignature));
        let mut tampered = sign_reply(&body(Some((3, 2))), &key(1));
        tampered.body = tampered.body.replace("\"version\":2", "\"version\":1");
        assert_eq!(open(&tampered), Err(ReplyError::BadSignature));
        let mut garbage = tampered.clone();
        garbage.signature = "not base64!".into();
        assert_eq!(open(&garbage), Err(ReplyError::SignatureFormat));
        // A bundle manifest signature (over the bare text) is no reply signature.
        let text = serde_json::to_string(&body(None)).unwrap();
        let bare = SignedReply {
            signature: BASE64.encode(key(1).sign(text.as_bytes()).to_bytes()),
            body: text,
        };
        assert_eq!(open(&bare), Err(ReplyError::BadSignature));
    }

    #[test]
    fn values_out_of_bounds_are_refused_even_when_signed() {
        // The attack: seq 2^63 - 1 with version 1.
        let huge = sign_reply(&body(Some((i64::MAX as u64, 1))), &key(1));
        assert_eq!(open(&huge), Err(ReplyError::SeqOutOfRange(i64::MAX as u64)));
        let max = sign_reply(&body(Some((u64::MAX, 1))), &key(1));
        assert_eq!(open(&max), Err(ReplyError::SeqOutOfRange(u64::MAX)));
        for interval in [0, 301, u64::MAX] {
            let mut b = body(None);
            b.report_interval_s = interval;
            assert_eq!(
                open(&sign_reply(&b, &key(1))),
                Err(ReplyError::Interval(interval))
            );
        }
        let mut b = body(Some((1, 1)));
        b.order.as_mut().unwrap().confirm_s = Some(u64::MAX);
        assert_eq!(
            open(&sign_reply(&b, &key(1))),
            Err(ReplyError::Confirm(u64::MAX))
        );
        let mut b = body(None);
        b.versions = (1..=65).collect();
        assert_eq!(
            open(&sign_reply(&b, &key(1))),
            Err(ReplyError::TooManyVersions(65))
        );
        let mut b = body(None);
        b.versions = vec![0];
        assert_eq!(open(&sign_reply(&b, &key(1))), Err(ReplyError::VersionZero));
        let mut bad = sign_reply(&body(None), &key(1));
        bad.body = "{\"node_id\": 7".into();
        bad.signature = BASE64.encode(key(1).sign(&signed_message(&bad.body)).to_bytes());
        assert!(matches!(open(&bad), Err(ReplyError::Body(_))));
    }

    fn order(seq: u64, version: u32) -> Order {
        Order {
            seq,
            version,
            confirm_s: None,
        }
    }

    #[test]
    fn orders_are_new_once_and_within_a_step() {
        use OrderVerdict::*;
        assert_eq!(judge_order(&order(1, 2), LastOrder::None), Ok(New));
        assert_eq!(
            judge_order(&order(4, 2), LastOrder::Signed { seq: 3 }),
            Ok(New)
        );
        assert_eq!(
            judge_order(&order(3, 2), LastOrder::Signed { seq: 3 }),
            Ok(Done)
        );
        assert_eq!(
            judge_order(&order(2, 9), LastOrder::Signed { seq: 3 }),
            Ok(Done)
        );
        assert_eq!(
            judge_order(
                &order(3 + MAX_ORDER_STEP + 1, 2),
                LastOrder::Signed { seq: 3 }
            ),
            Err(ReplyError::SeqJump {
                seq: 3 + MAX_ORDER_STEP + 1,
                last: 3
            })
        );
        assert_eq!(
            judge_order(&order(MAX_ORDER_STEP + 3, 2), LastOrder::Signed { seq: 3 }),
            Ok(New)
        );
    }

    #[test]
    fn a_legacy_record_is_no_floor_but_stops_a_repeat() {
        use OrderVerdict::*;
        // The attacker's order left seq 2^63 - 1 on disk: the controller's real orders still
        // run.
        let wedged = LastOrder::Legacy {
            seq: i64::MAX as u64,
            version: 1,
        };
        assert_eq!(judge_order(&order(3, 2), wedged), Ok(New));
        // A genuine order carried out before the upgrade does not run again.
        let genuine = LastOrder::Legacy { seq: 3, version: 2 };
        assert_eq!(judge_order(&order(3, 2), genuine), Ok(Done));
        assert_eq!(judge_order(&order(4, 2), genuine), Ok(New));
    }
}
