//! The schema of the daemons' counters: the `STATS {json}` line splitvisor-blk and
//! splitvisor-net write to stderr (on each disconnect, on SIGUSR1 and at exit) and the
//! `GET /stats` answer of their `--api-socket`, which the VMM fetches for `GET /metrics`.
//! The daemons serialize these types and the VMM deserializes the same ones, so a field
//! renamed on one side cannot silently vanish on the other.
//!
//! Field order is the order of the STATS line (users and tests read it).

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Counters of one splitvisor-blk virtqueue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkQueueStats {
    pub queue: u64,
    pub requests: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub kicks: u64,
    pub interrupts: u64,
}

/// splitvisor-blk's STATS line: `{"queues":[...]}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkStatsLine {
    pub queues: Vec<BlkQueueStats>,
}

/// Dropped frames by reason (`tx_too_short`, `no_rx_buffers`, ...), in the daemon's order:
/// a JSON object whose keys keep the order they were written in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drops(pub Vec<(String, u64)>);

impl Drops {
    /// Each reason and its count, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(reason, n)| (reason.as_str(), *n))
    }
}

impl Serialize for Drops {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (reason, n) in &self.0 {
            map.serialize_entry(reason, n)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Drops {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DropsVisitor;
        impl<'de> Visitor<'de> for DropsVisitor {
            type Value = Drops;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of drop counts by reason")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Drops, A::Error> {
                let mut drops = Vec::new();
                while let Some(entry) = map.next_entry::<String, u64>()? {
                    drops.push(entry);
                }
                Ok(Drops(drops))
            }
        }
        deserializer.deserialize_map(DropsVisitor)
    }
}

/// Counters of one splitvisor-net RX/TX queue pair.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetQueueStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub rx_kicks: u64,
    pub tx_kicks: u64,
    pub rx_interrupts: u64,
    pub tx_interrupts: u64,
    pub drops: Drops,
}

/// One splitvisor-net socket (its TAP socket, or a switch port). Its STATS line has no
/// `state` (left empty, it is not written); `GET /stats` adds "connected" or "waiting".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetPortStats {
    pub socket: String,
    pub connections: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    pub queues: Vec<NetQueueStats>,
}

/// splitvisor-net's counters in `GET /stats`: one entry per socket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetPorts {
    pub ports: Vec<NetPortStats>,
}

/// Either daemon's counters, as the VMM reads them: `queues` for splitvisor-blk, `ports`
/// for splitvisor-net, the other null.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnyCounters {
    #[serde(default)]
    pub queues: Option<Vec<BlkQueueStats>>,
    #[serde(default)]
    pub ports: Option<Vec<NetPortStats>>,
}

/// `GET /stats` of a daemon: its counters (`C`: [`BlkStatsLine`] for splitvisor-blk,
/// [`NetPorts`] for splitvisor-net, [`AnyCounters`] for a reader that takes either) plus
/// uptime and connection state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStats<C = AnyCounters> {
    /// "splitvisor-blk" or "splitvisor-net".
    pub daemon: String,
    pub uptime_ms: u64,
    /// "connected" (a frontend is attached; any port, for the net switch) or "waiting".
    pub state: String,
    /// Frontends served so far.
    pub frontends: u64,
    #[serde(flatten)]
    pub counters: C,
}

/// The `state` of a daemon or port.
pub fn state_name(connected: bool) -> &'static str {
    if connected {
        "connected"
    } else {
        "waiting"
    }
}

/// The `STATS {json}` line for `counters` (without the newline).
pub fn stats_line<T: Serialize>(counters: &T) -> String {
    // These types hold only strings and integers: serializing them cannot fail.
    let json = serde_json::to_string(counters).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    format!("STATS {json}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_blk_line_keeps_its_bytes() {
        let line = BlkStatsLine {
            queues: vec![BlkQueueStats {
                queue: 1,
                read_bytes: 512,
                ..Default::default()
            }],
        };
        assert_eq!(
            stats_line(&line),
            "STATS {\"queues\":[{\"queue\":1,\"requests\":0,\"read_bytes\":512,\"write_bytes\":0,\"kicks\":0,\"interrupts\":0}]}"
        );
    }

    #[test]
    fn a_net_line_has_no_state_and_drops_keep_their_order() {
        let port = NetPortStats {
            socket: "/tmp/a\"b.sock".into(),
            connections: 2,
            state: String::new(),
            queues: vec![NetQueueStats {
                tx_frames: 1,
                drops: Drops(vec![("tx_too_short".into(), 0), ("bad_address".into(), 1)]),
                ..Default::default()
            }],
        };
        let line = stats_line(&port);
        assert_eq!(
            line,
            "STATS {\"socket\":\"/tmp/a\\\"b.sock\",\"connections\":2,\"queues\":[{\"rx_frames\":0,\
             \"rx_bytes\":0,\"tx_frames\":1,\"tx_bytes\":0,\"rx_kicks\":0,\"tx_kicks\":0,\
             \"rx_interrupts\":0,\"tx_interrupts\":0,\"drops\":{\"tx_too_short\":0,\"bad_address\":1}}]}"
        );
        let back: NetPortStats = serde_json::from_str(&line["STATS ".len()..]).unwrap();
        assert_eq!(back, port);
    }

    #[test]
    fn the_vmm_reads_either_daemons_answer() {
        let blk = DaemonStats {
            daemon: "splitvisor-blk".into(),
            uptime_ms: 5,
            state: state_name(false).into(),
            frontends: 0,
            counters: BlkStatsLine {
                queues: vec![BlkQueueStats::default()],
            },
        };
        let value = serde_json::to_value(&blk).unwrap();
        assert!(value.get("ports").is_none(), "{value}");
        let read: DaemonStats = serde_json::from_value(value).unwrap();
        assert_eq!(
            read.counters.queues.as_deref(),
            Some(&blk.counters.queues[..])
        );
        assert_eq!(read.counters.ports, None);
        // The VMM's own report shows the other daemon's field as null.
        let shown = serde_json::to_value(&read).unwrap();
        assert!(
            shown["ports"].is_null() && shown.get("ports").is_some(),
            "{shown}"
        );
        let net: DaemonStats = serde_json::from_str(
            r#"{"daemon":"splitvisor-net","uptime_ms":1,"state":"connected","frontends":1,
                "ports":[{"socket":"/s","connections":1,"state":"connected","queues":[]}]}"#,
        )
        .unwrap();
        assert_eq!(net.counters.ports.unwrap()[0].state, "connected");
    }
}
