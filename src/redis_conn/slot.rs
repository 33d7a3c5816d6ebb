//! Which hash slot a command belongs to: Redis Cluster's CRC16 (XMODEM) of the key's hash tag,
//! modulo 16384, and where the key sits in the commands tollgate sends.

use redis::{Arg, Cmd};

pub const SLOTS: usize = 16384;

/// CRC16-CCITT (XMODEM), as Redis Cluster computes it.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key: only the part inside the first non-empty `{…}` counts.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS as u16
}

/// Where a command must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The primary serving this slot.
    Slot(u16),
    /// Every primary (SCRIPT LOAD / FLUSH: each node has its own script cache).
    AllPrimaries,
    /// Any node (PING, TIME, PUBLISH: a cluster forwards PUBLISH to every node).
    Any,
}

fn arg(cmd: &Cmd, i: usize) -> Option<&[u8]> {
    match cmd.args_iter().nth(i)? {
        Arg::Simple(a) => Some(a),
        _ => None,
    }
}

/// Routes the commands tollgate sends; a command not listed here with a key in first position
/// is routed by that key.
pub fn target(cmd: &Cmd) -> Target {
    let Some(name) = arg(cmd, 0) else {
        return Target::Any;
    };
    let name = name.to_ascii_uppercase();
    match name.as_slice() {
        b"SCRIPT" => Target::AllPrimaries,
        b"PING" | b"TIME" | b"PUBLISH" | b"INFO" | b"CLUSTER" | b"ECHO" | b"DBSIZE" => Target::Any,
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" => {
            let keys = arg(cmd, 2)
                .and_then(|n| std::str::from_utf8(n).ok()?.parse::<u64>().ok())
                .unwrap_or(0);
            match arg(cmd, 3) {
                Some(key) if keys > 0 => Target::Slot(key_slot(key)),
                _ => Target::Any,
            }
        }
        b"XREAD" | b"XREADGROUP" => cmd
            .args_iter()
            .skip_while(|a| !matches!(a, Arg::Simple(s) if s.eq_ignore_ascii_case(b"STREAMS")))
            .nth(1)
            .and_then(|a| match a {
                Arg::Simple(key) => Some(Target::Slot(key_slot(key))),
                _ => None,
            })
            .unwrap_or(Target::Any),
        _ => arg(cmd, 1).map_or(Target::Any, |key| Target::Slot(key_slot(key))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from the Redis Cluster specification / CLUSTER KEYSLOT.
        assert_eq!(key_slot(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_eq!(key_slot(b"{tg:s3}:acct:a"), key_slot(b"tg:s3"));
    }

    #[test]
    fn commands_route_by_their_key() {
        let mut c = redis::cmd("EVALSHA");
        c.arg("abc")
            .arg(2)
            .arg("{tg:s1}:a")
            .arg("{tg:s1}:b")
            .arg("x");
        assert_eq!(target(&c), Target::Slot(key_slot(b"tg:s1")));
        let mut c = redis::cmd("XREADGROUP");
        c.arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(5)
            .arg("STREAMS")
            .arg("{tg:s9}:usage")
            .arg(">");
        assert_eq!(target(&c), Target::Slot(key_slot(b"tg:s9")));
        assert_eq!(
            target(redis::cmd("SCRIPT").arg("LOAD")),
            Target::AllPrimaries
        );
        assert_eq!(target(&redis::cmd("TIME")), Target::Any);
        assert_eq!(
            target(redis::cmd("HGETALL").arg("{tg:s2}:acct:x")),
            Target::Slot(key_slot(b"tg:s2"))
        );
    }
}
