//! The transport's tests: redaction, backoff, a server that is down, and tasks that run on
//! (and stop with) the runtime they are given.

use super::*;

#[test]
fn passwords_never_reach_messages() {
    assert_eq!(
        redact("redis://:secret@host:6379/0"),
        "redis://***@host:6379/0"
    );
    assert_eq!(redact("redis://host:6379"), "redis://host:6379");
}

#[test]
fn backoff_is_capped() {
    assert_eq!(backoff(0), Duration::from_millis(50));
    assert_eq!(backoff(10), Duration::from_secs(1));
}

/// Publish results and deliveries, sent on as they come.
struct Collect(std::sync::mpsc::Sender<Result<Vec<String>, Message>>);

impl Sink for Collect {
    fn confirmed(&self, results: Vec<crate::transport::Confirm>) {
        for (_, r) in results {
            let _ = self.0.send(Ok(r.expect("published")));
        }
    }
    fn delivered(&self, entries: Vec<Message>) {
        for e in entries {
            let _ = self.0.send(Err(e));
        }
    }
}

fn config(url: &str, stream: &str, consume: bool) -> Config {
    Config {
        url: url.into(),
        streams: vec![stream.into()],
        group: "g".into(),
        consumer: "c".into(),
        claim_idle: Duration::from_secs(30),
        maxlen: 0,
        batch: 16,
        prefetch: 64,
        max_deliveries: 3,
        dead_stream: format!("{stream}:dead"),
        publish_timeout: Duration::from_secs(5),
        consume,
        leases: None,
    }
}

fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn connecting_to_a_server_that_is_down_fails_naming_it() {
    let rt = test_runtime();
    let (tx, _rx) = std::sync::mpsc::channel();
    let cfg = config("redis://:pw@127.0.0.1:1/0", "s", true);
    let err = rt
        .block_on(RedisStreams::connect(
            cfg,
            Arc::new(Collect(tx)),
            rt.handle().clone(),
        ))
        .expect_err("nothing listens on port 1");
    let text = err.to_string();
    assert!(
        matches!(
            err,
            TransportError::Broker {
                broker: "redis",
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("pw"), "{text}");
}

#[test]
fn transports_run_on_the_runtime_they_are_given_and_stop_ends_only_their_own_tasks() {
    const URL: &str = "redis://127.0.0.1:6379/0";
    if std::net::TcpStream::connect("127.0.0.1:6379").is_err() {
        assert!(
            std::env::var("OXBUS_CI").as_deref() != Ok("1"),
            "OXBUS_CI=1 forbids skipping: Redis at 127.0.0.1:6379 is unreachable"
        );
        eprintln!("skipped: Redis at 127.0.0.1:6379 is unreachable");
        return;
    }
    let stream = format!("oxbus-test:rust:{}", uuid::Uuid::new_v4().simple());
    let rt = test_runtime();
    let h = rt.handle().clone();
    let (tx_a, rx_a) = std::sync::mpsc::channel();
    let (tx_b, rx_b) = std::sync::mpsc::channel();
    let a = rt
        .block_on(RedisStreams::connect(
            config(URL, &stream, true),
            Arc::new(Collect(tx_a)),
            h.clone(),
        ))
        .expect("connects");
    let b = rt
        .block_on(RedisStreams::connect(
            config(URL, &format!("{stream}:b"), false),
            Arc::new(Collect(tx_b)),
            h,
        ))
        .expect("connects");
    let wait = Duration::from_secs(10);
    a.queue(1, vec![(0, "{\"n\":1}".into())]).expect("queued");
    let mut got = (None, None);
    while got.0.is_none() || got.1.is_none() {
        match rx_a.recv_timeout(wait).expect("a result or an entry") {
            Ok(ids) => got.0 = Some(ids),
            Err(e) => got.1 = Some(e),
        }
    }
    let (ids, entry) = (got.0.unwrap(), got.1.unwrap());
    assert_eq!(ids, vec![entry.id.clone()]);
    assert_eq!(entry.payload, "{\"n\":1}");
    a.ack(&entry);
    rt.block_on(a.stop());
    assert!(a.is_stopped());
    assert_eq!(
        a.queue(2, vec![(0, "{}".into())]),
        Err(TransportError::Stopped("redis"))
    );
    rt.block_on(a.stop()); // idempotent
                           // The runtime and the other transport go on.
    b.queue(3, vec![(0, "{}".into())]).expect("queued");
    assert!(matches!(rx_b.recv_timeout(wait), Ok(Ok(ids)) if ids.len() == 1));
    rt.block_on(b.stop());
    let h = a.health();
    assert_eq!((h.published, h.received), (1, 1));
    drop((a, b));
    // Clean up the streams.
    rt.block_on(async {
        let client = Client::open(URL).expect("url");
        let mut c = connect(&client, None).await.expect("connects");
        let _: () = redis::cmd("DEL")
            .arg(&stream)
            .arg(format!("{stream}:b"))
            .query_async(&mut c)
            .await
            .expect("DEL");
    });
}
