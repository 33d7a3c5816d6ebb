use super::*;
use clap::Parser;

#[derive(Parser)]
struct TestCli {
    #[command(flatten)]
    args: Args,
}

fn args(list: &[&str]) -> Args {
    let mut v = vec!["loadtest"];
    v.extend_from_slice(list);
    TestCli::try_parse_from(v).unwrap().args
}

#[test]
fn durations() {
    let ms = Duration::from_millis;
    assert_eq!(parse_duration("10s").unwrap(), ms(10_000));
    assert_eq!(parse_duration("500ms").unwrap(), ms(500));
    assert_eq!(parse_duration("1m").unwrap(), ms(60_000));
    assert_eq!(parse_duration("1.5m").unwrap(), ms(90_000));
    assert_eq!(parse_duration("2h").unwrap(), ms(7_200_000));
    assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
    assert_eq!(parse_duration("250µs").unwrap(), Duration::from_micros(250));
    assert_eq!(parse_duration("3").unwrap(), ms(3_000));
    assert_eq!(parse_duration(" 0 ").unwrap(), Duration::ZERO);
    assert_eq!(parse_duration("0.25s").unwrap(), ms(250));
    for bad in ["", "s", "ms", "-1s", "10x", "1.2.3s", "abc", ".", "10 s s"] {
        assert!(
            matches!(parse_duration(bad), Err(LoadtestError::Duration(_))),
            "{bad:?}"
        );
    }
    assert!(matches!(
        parse_duration("1000h"),
        Err(LoadtestError::DurationTooLong(_))
    ));
}

#[test]
fn headers() {
    assert_eq!(
        parse_header("Content-Type: application/json").unwrap(),
        Header {
            name: "Content-Type".into(),
            value: "application/json".into()
        }
    );
    assert_eq!(
        parse_header("x-a:b:c").unwrap(),
        Header {
            name: "x-a".into(),
            value: "b:c".into()
        }
    );
    assert_eq!(parse_header("X-Empty:").unwrap().value, "");
    for bad in ["no colon", ": value", "bad name: v", "x: a\r\nb", "x\n: v"] {
        assert!(
            matches!(parse_header(bad), Err(LoadtestError::Header(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn targets() {
    let t = Target::parse("http://example.com/v1/x?a=1&b=2").unwrap();
    assert_eq!(t.authority, "example.com:80");
    assert_eq!(t.host_header, "example.com");
    assert_eq!(t.path, "/v1/x?a=1&b=2");
    let t = Target::parse("http://127.0.0.1:8080").unwrap();
    assert_eq!(t.authority, "127.0.0.1:8080");
    assert_eq!(t.host_header, "127.0.0.1:8080");
    assert_eq!(t.path, "/");
    let t = Target::parse("http://[::1]:9000/a").unwrap();
    assert_eq!(t.authority, "[::1]:9000");
    for bad in [
        "https://example.com/",
        "ftp://x/",
        "not a url",
        "http://u:p@h/",
    ] {
        assert!(
            matches!(Target::parse(bad), Err(LoadtestError::Url { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn plan_builds_one_request_per_key() {
    let plan = Plan::from_args(&args(&[
        "http://127.0.0.1:8080/v1/chat?x=1",
        "-X",
        "POST",
        "--body",
        "{}",
        "-H",
        "content-type: application/json",
        "--key",
        "k1",
        "--key",
        "k2",
        "--rate",
        "100",
    ]))
    .unwrap();
    assert_eq!(plan.mode, Mode::Open { rate: 100.0 });
    assert_eq!(plan.requests.len(), 2);
    assert_eq!(
        std::str::from_utf8(&plan.requests[1]).unwrap(),
        "POST /v1/chat?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: tollgate-loadtest\r\n\
         content-type: application/json\r\nAuthorization: Bearer k2\r\nContent-Length: 2\r\n\r\n{}"
    );
    let plan = Plan::from_args(&args(&["http://h/"])).unwrap();
    assert_eq!(plan.mode, Mode::Closed);
    assert_eq!(plan.connections, 32);
    assert_eq!(plan.threads, 1);
    assert_eq!(plan.duration, Duration::from_secs(10));
    assert_eq!(
        std::str::from_utf8(&plan.requests[0]).unwrap(),
        "GET / HTTP/1.1\r\nHost: h\r\nUser-Agent: tollgate-loadtest\r\n\r\n"
    );
    let plan = Plan::from_args(&args(&["http://h/", "-X", "HEAD", "-H", "Host: other"])).unwrap();
    assert!(plan.head);
    assert_eq!(
        std::str::from_utf8(&plan.requests[0]).unwrap(),
        "HEAD / HTTP/1.1\r\nUser-Agent: tollgate-loadtest\r\nHost: other\r\n\r\n"
    );
}

#[test]
fn plan_rejects_bad_input() {
    for bad in [
        &["http://h/", "--rate", "0"][..],
        &["http://h/", "--rate=-5"],
        &["http://h/", "--rate", "NaN"],
        &["http://h/", "--connections", "0"],
        &["http://h/", "--threads", "0"],
        &["http://h/", "--duration", "0s"],
        &["http://h/", "--timeout", "0s"],
        &["http://h/", "-X", "GE T"],
        &["http://h/", "-H", "Content-Length: 5"],
        &["http://h/", "-H", "authorization: x", "--key", "k"],
        &["http://h/", "--key", "a b"],
        &["https://h/"],
        &[
            "http://h/",
            "--body-file",
            "/nonexistent/tollgate-loadtest-body",
        ],
    ] {
        assert!(Plan::from_args(&args(bad)).is_err(), "{bad:?}");
    }
    assert!(
        TestCli::try_parse_from(["loadtest", "http://h/", "--body", "x", "--body-file", "f"])
            .is_err()
    );
    assert!(TestCli::try_parse_from(["loadtest", "http://h/", "--duration", "ten"]).is_err());
    assert!(TestCli::try_parse_from(["loadtest", "http://h/", "-H", "nocolon"]).is_err());
}
