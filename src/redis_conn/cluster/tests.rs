use super::*;

fn bulk(s: &str) -> Value {
    Value::BulkString(s.as_bytes().to_vec())
}

#[test]
fn slot_map_from_cluster_slots() {
    let reply = Value::Array(vec![
        Value::Array(vec![
            Value::Int(0),
            Value::Int(5460),
            Value::Array(vec![bulk("127.0.0.1"), Value::Int(7001), bulk("id1")]),
        ]),
        Value::Array(vec![
            Value::Int(5461),
            Value::Int(16383),
            Value::Array(vec![bulk(""), Value::Int(7002), bulk("id2")]),
            Value::Array(vec![bulk("127.0.0.1"), Value::Int(7003), bulk("id3")]),
        ]),
    ]);
    let t = parse_slots(&reply, "10.1.1.1:7002").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.owner_of(0), Some("127.0.0.1:7001"));
    assert_eq!(t.owner_of(5460), Some("127.0.0.1:7001"));
    assert_eq!(t.owner_of(5461), Some("10.1.1.1:7002"));
    assert_eq!(t.owner_of(16383), Some("10.1.1.1:7002"));
    assert_eq!(t.primaries.len(), 2);
}

#[test]
fn redirects_are_recognised() {
    assert!(matches!(
        server_redirect(Some(ServerErrorKind::Moved), Some("3999 127.0.0.1:6381")),
        Some(Redirect::Moved { slot: 3999, ref addr }) if addr == "127.0.0.1:6381"
    ));
    assert!(matches!(
        server_redirect(Some(ServerErrorKind::Ask), Some("3999 127.0.0.1:6382")),
        Some(Redirect::Ask { ref addr }) if addr == "127.0.0.1:6382"
    ));
    assert!(matches!(
        server_redirect(Some(ServerErrorKind::TryAgain), None),
        Some(Redirect::Wait)
    ));
    assert!(server_redirect(Some(ServerErrorKind::NoScript), None).is_none());
}
