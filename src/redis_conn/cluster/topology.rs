//! The cluster's slot map: which primary serves which slot, as `CLUSTER SLOTS` tells it.

use redis::{ErrorKind, RedisError, RedisResult, Value};

use super::super::slot::SLOTS;
use super::{int, text};

/// No node serves the slot.
pub(super) const NO_OWNER: u16 = u16::MAX;

/// Who serves which slot.
pub(super) struct Topology {
    /// Slot → index into `primaries` (`NO_OWNER` when no node serves it).
    pub(super) owner: Box<[u16]>,
    pub(super) primaries: Vec<String>,
}

impl Topology {
    pub(super) fn empty() -> Self {
        Topology {
            owner: vec![NO_OWNER; SLOTS].into_boxed_slice(),
            primaries: Vec::new(),
        }
    }

    pub(super) fn owner_of(&self, slot: u16) -> Option<&str> {
        let i = *self.owner.get(usize::from(slot))?;
        self.primaries.get(usize::from(i)).map(String::as_str)
    }
}

/// Parses `CLUSTER SLOTS`: `[[start, end, [ip, port, id, …], replicas…], …]`. An empty ip
/// means the node that answered.
pub(super) fn parse_slots(v: &Value, asked: &str) -> RedisResult<Topology> {
    let bad = |what: &str| {
        RedisError::from((
            ErrorKind::UnexpectedReturnType,
            "unexpected CLUSTER SLOTS reply",
            what.to_string(),
        ))
    };
    let Value::Array(ranges) = v else {
        return Err(bad("not an array"));
    };
    let asked_host = asked.rsplit_once(':').map_or(asked, |(h, _)| h);
    let mut topology = Topology::empty();
    for range in ranges {
        let Value::Array(parts) = range else {
            return Err(bad("range"));
        };
        let (Some(start), Some(end), Some(Value::Array(node))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return Err(bad("range fields"));
        };
        let (Some(start), Some(end)) = (int(start), int(end)) else {
            return Err(bad("slot numbers"));
        };
        let host = node.first().and_then(text).unwrap_or_default();
        let host = if host.is_empty() || host == "?" {
            asked_host.to_string()
        } else {
            host
        };
        let port = node.get(1).and_then(int).ok_or_else(|| bad("port"))?;
        let addr = format!("{host}:{port}");
        let index = match topology.primaries.iter().position(|p| *p == addr) {
            Some(i) => i,
            None => {
                topology.primaries.push(addr);
                topology.primaries.len() - 1
            }
        };
        let index = u16::try_from(index).map_err(|_| bad("too many nodes"))?;
        let (Ok(start), Ok(end)) = (usize::try_from(start), usize::try_from(end)) else {
            return Err(bad("slot range"));
        };
        for slot in start..=end.min(SLOTS - 1) {
            if let Some(o) = topology.owner.get_mut(slot) {
                *o = index;
            }
        }
    }
    if topology.primaries.is_empty() {
        return Err(bad("no slots assigned"));
    }
    Ok(topology)
}
