//! Entry points for the fuzz targets (`fuzz/`, `crates/fuzz`) into what this crate decodes from
//! other processes and from disk and keeps private: Raft messages as a peer sends them, the
//! entries and snapshots inside them as the state machine applies them, and the peer-address
//! data of configuration changes and snapshots.
//!
//! Each function takes arbitrary bytes and must neither panic nor allocate beyond what the
//! bytes justify; where a decoded value must survive re-encoding, it asserts so. Not part of
//! the API: hidden from the docs and free to change with the targets.

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeV2, EntryType, Message};

use crate::raft::StateMachine as _;
use crate::raft::{decode_peers, encode_peers, snapshot_state};
use crate::state::replica::{Replica, ReplicaMachine};

/// A Raft message as `tessera.cluster.v1.Raft/Send` receives it: decoded with raft-rs's codec,
/// then every entry and the snapshot decoded and applied as a follower would (conf changes
/// parsed and their peer addresses read; normal entries applied to a fresh cluster state in
/// order; snapshot data split into addresses and state and restored).
///
/// # Panics
/// When a decoded message does not re-encode to a message with the same fields, or decoded peer
/// addresses do not re-encode to bytes that decode to the same addresses.
pub fn raft_message(data: &[u8]) {
    let Ok(msg) = Message::parse_from_bytes(data) else {
        return;
    };
    // A follower persists the entries it receives and reads them back after a restart: what
    // decoded must re-encode to the same message. Compared in text form, which holds every
    // known field: protobuf 2 tells an empty set of unknown fields from none (found by this
    // target), a difference no reader can observe.
    let again = msg
        .write_to_bytes()
        .ok()
        .and_then(|b| Message::parse_from_bytes(&b).ok());
    assert_eq!(
        again.map(|m| format!("{m:?}")),
        Some(format!("{msg:?}")),
        "a decoded message re-encodes to itself"
    );

    let mut machine = ReplicaMachine(Replica::new("fuzz"));
    for e in msg.get_entries() {
        match e.get_entry_type() {
            EntryType::EntryNormal if !e.data.is_empty() => {
                // A refused command is an error answer, never a panic or a half-applied state.
                let _ = machine.apply(e.index, &e.data);
            }
            EntryType::EntryNormal => {}
            EntryType::EntryConfChange => {
                if let Ok(cc) = ConfChange::parse_from_bytes(&e.data) {
                    peers(cc.get_context());
                }
            }
            EntryType::EntryConfChangeV2 => {
                if let Ok(cc) = ConfChangeV2::parse_from_bytes(&e.data) {
                    peers(cc.get_context());
                }
            }
        }
    }
    let snap = msg.get_snapshot().get_data();
    peers(snap);
    if let Ok(state) = snapshot_state(snap) {
        let _ = machine.restore(state);
    }
}

/// Decodes peer addresses and checks that what decoded encodes back to the same addresses.
fn peers(data: &[u8]) {
    if let Ok(map) = decode_peers(data) {
        let again = decode_peers(&encode_peers(&map));
        assert_eq!(again.as_ref(), Ok(&map), "peer addresses round-trip");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{ConfChangeType, Entry, MessageType, Snapshot};

    /// Ensures that the target runs a message with every kind of entry and a snapshot through
    /// without complaint, and ignores bytes that are not a message.
    #[test]
    fn runs_a_message_of_every_entry_kind() {
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddNode);
        cc.node_id = 2;
        cc.context = encode_peers(&[(2, "127.0.0.1:1".to_owned())].into()).into();
        let mut entries = vec![Entry::default(); 3];
        entries[0].set_entry_type(EntryType::EntryConfChange);
        entries[0].data = cc.write_to_bytes().expect("encodes").into();
        entries[1].data = br#"{"SetModel":{"model":"m"}}"#.to_vec().into();
        entries[2].data = b"not json".to_vec().into();
        let snap = Snapshot {
            data: encode_peers(&[(1, "a:1".to_owned())].into()).into(),
            ..Default::default()
        };
        let mut msg = Message::default();
        msg.set_msg_type(MessageType::MsgAppend);
        msg.set_entries(entries.into());
        msg.set_snapshot(snap);
        raft_message(&msg.write_to_bytes().expect("encodes"));
        raft_message(b"\xff\xff\xff");
    }
}
