//! The primary's rules for what a secondary relays: the hello must name the secondary its
//! certificate names, every event's chain must end with that secondary and must not hold this
//! server (a loop), a batch has a bounded size, and an invalid event is refused alone (listed
//! in the acknowledgement) while a store failure breaks the link (nothing is acknowledged, the
//! secondary resends). Errors are [`RelayError`]; `crate::api::status` gives them their codes.

use futures::stream::{FuturesOrdered, StreamExt};

use super::secondaries::LinkError;
use crate::classify::{RelayTag, RelayedIncoming};
use crate::engine::{Engine, EngineError};

/// Largest relay message, both ways, whatever `max_message_bytes` says: the sender keeps its
/// batches under a quarter of it ([`MAX_BATCH_BYTES`]), so a batch is never refused for its size.
pub const RELAY_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Most encoded bytes of events in one batch the sender cuts.
pub const MAX_BATCH_BYTES: usize = RELAY_MAX_MESSAGE_BYTES / 4;
/// Most events in one relayed batch.
pub const RELAY_MAX_BATCH_EVENTS: usize = 10_000;
/// Most servers in a relayed event's chain (the hierarchy's depth).
pub const RELAY_MAX_CHAIN: usize = 32;
/// Longest server id in a relayed event.
const RELAY_MAX_SERVER_ID_BYTES: usize = 256;

/// Why a relay stream, or one relayed event, is refused.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A message or an event is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The stream ended before its hello.
    #[error("the relay stream ended before its hello")]
    NoHello,
    /// The first message was not a hello, or a hello came twice.
    #[error("{0}")]
    OutOfOrder(&'static str),
    /// No hello within the keepalive timeout.
    #[error("no hello within {0} s")]
    HelloTimeout(u64),
    /// `Relay` was called on a listener that does not serve it.
    #[error("Relay is served only on the hierarchy listener (mutual TLS, [hierarchy] listen)")]
    WrongListener,
    /// The caller has no client certificate, hence no identity.
    #[error("Relay needs a client certificate")]
    NoCertificate,
    /// The hello names a server the client certificate does not.
    #[error("hello.server_id {server_id:?} is not a name of the client certificate ({names})")]
    NotCertified {
        /// The id in the hello.
        server_id: String,
        /// The certificate's names, comma-separated.
        names: String,
    },
    /// An event's chain does not end with the secondary on this link.
    #[error("server_chain must end with the sending secondary {0:?}")]
    NotFromSender(String),
    /// An event already passed through this server.
    #[error("this server ({0}) is already in the server chain: the hierarchy has a loop")]
    Loop(String),
    /// The registry refused the link.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// This server's classification refused the event.
    #[error(transparent)]
    Event(EngineError),
    /// This server shuts down; the secondary reconnects later.
    #[error("the primary server is shutting down")]
    ShuttingDown,
    /// The store could not take the batch now; nothing of it is acknowledged.
    #[error("storing relayed events failed: {0}")]
    Unstored(EngineError),
}

impl RelayError {
    /// Whether the error concerns one event only: that event is refused and listed in the
    /// acknowledgement, and the link goes on (no event can stall an outbox).
    pub fn refuses_event_only(&self) -> bool {
        match self {
            RelayError::Event(e) => {
                matches!(e, EngineError::Invalid(_))
            }
            RelayError::Unstored(_) | RelayError::ShuttingDown => false,
            _ => true,
        }
    }
}

/// Checks that a hello's `server_id` is one of the `names` the client certificate vouches for.
pub fn check_hello(server_id: &str, names: &[String]) -> Result<(), RelayError> {
    if names.iter().any(|n| n == server_id) {
        Ok(())
    } else {
        Err(RelayError::NotCertified {
            server_id: server_id.to_owned(),
            names: names.join(", "),
        })
    }
}

/// Checks what a link vouches for: the chain ends with the `sender` on this link, starts with
/// the event's origin, does not hold this server (`own_id`), and is of sane size.
pub fn check_tag(tag: &RelayTag, sender: &str, own_id: &str) -> Result<(), RelayError> {
    let chain = &tag.chain;
    if chain.is_empty() || chain.len() > RELAY_MAX_CHAIN {
        return Err(RelayError::Invalid(format!(
            "server_chain: {} servers, 1 to {RELAY_MAX_CHAIN} allowed",
            chain.len()
        )));
    }
    if chain
        .iter()
        .any(|s| s.is_empty() || s.len() > RELAY_MAX_SERVER_ID_BYTES)
    {
        return Err(RelayError::Invalid(format!(
            "server_chain: server ids must be 1 to {RELAY_MAX_SERVER_ID_BYTES} bytes"
        )));
    }
    if chain.last().map(String::as_str) != Some(sender) {
        return Err(RelayError::NotFromSender(sender.to_owned()));
    }
    if chain.first() != Some(&tag.origin_server) {
        return Err(RelayError::Invalid(
            "origin_server_id must be the first server of server_chain".into(),
        ));
    }
    if chain.iter().any(|s| s == own_id) {
        return Err(RelayError::Loop(own_id.to_owned()));
    }
    Ok(())
}

/// One event of a relayed batch as the transport decoded it.
#[derive(Debug)]
pub struct RelayedItem {
    /// Its position in the sender's outbox.
    pub position: u64,
    /// Where it comes from, as the sender tagged it (checked by [`check_tag`]).
    pub relay: RelayTag,
    /// The event (its `relay` is filled from the checked tag), or why it could not be decoded.
    pub event: Result<RelayedIncoming, RelayError>,
}

/// An event of a batch refused alone.
#[derive(Debug)]
pub struct Rejection {
    /// Its position in the sender's outbox.
    pub position: u64,
    /// Its index in the batch.
    pub index: usize,
    /// Why.
    pub error: RelayError,
}

/// What a stored batch is answered with.
#[derive(Debug, Default)]
pub struct StoredBatch {
    /// The position to acknowledge (the batch's last), `None` for an empty batch.
    pub ack: Option<u64>,
    /// The events refused one by one.
    pub rejected: Vec<Rejection>,
}

/// Stores one batch relayed by `sender` and returns what to acknowledge once every event is
/// committed. An invalid event is refused alone; a store failure fails the whole batch
/// ([`RelayError::Unstored`]); a batch over [`RELAY_MAX_BATCH_EVENTS`] is refused whole.
pub async fn store_batch(
    engine: &Engine,
    sender: &str,
    items: impl ExactSizeIterator<Item = RelayedItem>,
) -> Result<StoredBatch, RelayError> {
    if items.len() > RELAY_MAX_BATCH_EVENTS {
        return Err(RelayError::Invalid(format!(
            "batch.events: {} events, at most {RELAY_MAX_BATCH_EVENTS}",
            items.len()
        )));
    }
    let mut out = StoredBatch::default();
    let mut pending = FuturesOrdered::new();
    for (index, item) in items.enumerate() {
        out.ack = Some(item.position);
        let checked = check_tag(&item.relay, sender, engine.server_id()).and_then(|()| {
            let mut event = item.event?;
            event.relay = item.relay;
            Ok(event)
        });
        let accepted = match checked {
            Ok(event) => engine
                .accept_relayed(event)
                .await
                .map_err(RelayError::Event),
            Err(e) => Err(e),
        };
        match accepted {
            Ok(p) => pending.push_back(engine.settle(p)),
            Err(error) if error.refuses_event_only() => out.rejected.push(Rejection {
                position: item.position,
                index,
                error,
            }),
            // The store cannot take it now: nothing of this batch is acknowledged, and the
            // secondary sends it again after reconnecting.
            Err(RelayError::Event(e)) => return Err(RelayError::Unstored(e)),
            Err(error) => return Err(error),
        }
    }
    while let Some(r) = pending.next().await {
        r.map_err(RelayError::Unstored)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(origin: &str, chain: &[&str]) -> RelayTag {
        RelayTag {
            origin_server: origin.into(),
            chain: chain.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The chain rules, each refusal with the error that says why.
    #[test]
    fn chains_end_with_the_sender_start_with_the_origin_and_do_not_loop() {
        let check = |t: RelayTag| check_tag(&t, "sec-a", "primary");
        assert!(check(tag("sec-a", &["sec-a"])).is_ok());
        assert!(check(tag("leaf", &["leaf", "sec-a"])).is_ok());
        assert!(matches!(
            check(tag("sec-a", &[])),
            Err(RelayError::Invalid(_))
        ));
        let long: Vec<&str> = std::iter::repeat_n("x", RELAY_MAX_CHAIN)
            .chain(["sec-a"])
            .collect();
        assert!(matches!(
            check(tag("x", &long)),
            Err(RelayError::Invalid(_))
        ));
        assert!(matches!(
            check(tag("", &["", "sec-a"])),
            Err(RelayError::Invalid(_))
        ));
        assert!(matches!(
            check(tag("sec-b", &["sec-b"])),
            Err(RelayError::NotFromSender(s)) if s == "sec-a"
        ));
        assert!(matches!(
            check(tag("sec-x", &["sec-y", "sec-a"])),
            Err(RelayError::Invalid(_))
        ));
        assert!(matches!(
            check(tag("primary", &["primary", "sec-a"])),
            Err(RelayError::Loop(s)) if s == "primary"
        ));
    }

    /// Refusals about the event stay with the event; a store failure breaks the link.
    #[test]
    fn only_store_failures_break_the_link() {
        assert!(RelayError::Loop("p".into()).refuses_event_only());
        assert!(RelayError::NotFromSender("s".into()).refuses_event_only());
        assert!(
            RelayError::Event(EngineError::Invalid(
                crate::classify::ClassifyError::Invalid {
                    field: "f",
                    reason: "r".into()
                }
            ))
            .refuses_event_only()
        );
        assert!(!RelayError::Event(EngineError::ShuttingDown).refuses_event_only());
        assert!(!RelayError::Unstored(EngineError::ShuttingDown).refuses_event_only());
    }

    /// The hello's id must be one of the certificate's names.
    #[test]
    fn hello_names_a_certified_server() {
        let names = vec!["sec-a".to_owned(), "sec-a.example".to_owned()];
        assert!(check_hello("sec-a.example", &names).is_ok());
        let e = check_hello("sec-b", &names).unwrap_err();
        assert_eq!(
            e.to_string(),
            "hello.server_id \"sec-b\" is not a name of the client certificate (sec-a, sec-a.example)"
        );
    }
}
