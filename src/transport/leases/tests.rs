//! Tests of the lease logic: the assignment and the partition table (pure), and two leased
//! transports sharing a group on the Redis at 127.0.0.1:6379 (skipped when it is unreachable,
//! except under `OXBUS_CI=1`).

use super::*;
use crate::transport::redis_streams::Config;
use crate::transport::{Confirm, Message, RedisStreams, Sink, Transport};

fn names(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|&x| x.to_owned()).collect()
}

fn owners(xs: &[Option<&str>]) -> Vec<Option<String>> {
    xs.iter().map(|x| x.map(str::to_owned)).collect()
}

/// The assignment as member names.
fn assigned(members: &[String], target: &[Option<usize>]) -> Vec<Option<String>> {
    target
        .iter()
        .map(|t| t.map(|k| members[k].clone()))
        .collect()
}

fn counts(m: usize, target: &[Option<usize>]) -> Vec<usize> {
    let mut c = vec![0; m];
    for k in target.iter().flatten() {
        c[*k] += 1;
    }
    c
}

#[test]
fn two_members_get_two_of_four_partitions_each() {
    let members = names(&["a", "b"]);
    let target = assign(&members, &[None, None, None, None]);
    assert_eq!(counts(2, &target), vec![2, 2]);
}

#[test]
fn every_partition_goes_to_a_member_and_shares_differ_by_at_most_one() {
    let mut rng = fastrand::Rng::with_seed(17);
    for m in 1..=6 {
        let members: Vec<String> = (0..m).map(|k| format!("m{k}")).collect();
        for n in 0..=13 {
            // Random current owners, some of them dead members.
            let current: Vec<Option<String>> = (0..n)
                .map(|_| match rng.usize(0..=m + 1) {
                    k if k < m => Some(members[k].clone()),
                    k if k == m => Some("dead".to_owned()),
                    _ => None,
                })
                .collect();
            let target = assign(&members, &current);
            assert!(
                target.iter().all(Option::is_some),
                "{m} members, {n} partitions"
            );
            let c = counts(m, &target);
            let (lo, hi) = (c.iter().min().unwrap(), c.iter().max().unwrap());
            assert!(hi - lo <= 1, "{m} members, {n} partitions: shares {c:?}");
        }
    }
}

#[test]
fn the_assignment_is_a_fixed_point_once_the_owners_follow_it() {
    let mut rng = fastrand::Rng::with_seed(3);
    for _ in 0..500 {
        let m = rng.usize(1..=5);
        let n = rng.usize(0..=12);
        let members: Vec<String> = (0..m).map(|k| format!("m{k}")).collect();
        let current: Vec<Option<String>> = (0..n)
            .map(|_| Some(members[rng.usize(0..m)].clone()).filter(|_| rng.bool()))
            .collect();
        let first = assigned(&members, &assign(&members, &current));
        let again = assigned(&members, &assign(&members, &first));
        assert_eq!(first, again, "from {current:?}");
    }
}

#[test]
fn a_member_joining_moves_only_the_partitions_it_takes() {
    // a and b hold two each; c joins: one partition moves to c, the rest stay.
    let members = names(&["a", "b", "c"]);
    let current = owners(&[Some("a"), Some("a"), Some("b"), Some("b")]);
    let target = assigned(&members, &assign(&members, &current));
    let moved = current.iter().zip(&target).filter(|(x, y)| x != y).count();
    assert_eq!(moved, 1, "{target:?}");
    assert_eq!(
        target.iter().filter(|t| t.as_deref() == Some("c")).count(),
        1
    );
}

#[test]
fn a_dead_members_partitions_go_to_the_live_ones_and_theirs_stay() {
    let members = names(&["a", "c"]);
    let current = owners(&[Some("a"), Some("b"), Some("c"), Some("b")]);
    let target = assigned(&members, &assign(&members, &current));
    assert_eq!(target[0].as_deref(), Some("a"));
    assert_eq!(target[2].as_deref(), Some("c"));
    assert_eq!(counts(2, &assign(&members, &current)), vec![2, 2]);
}

#[test]
fn with_more_members_than_partitions_current_owners_keep_theirs() {
    let members = names(&["a", "b", "c", "d"]);
    let current = owners(&[Some("d"), None]);
    let target = assigned(&members, &assign(&members, &current));
    assert_eq!(target, owners(&[Some("d"), Some("a")]));
}

#[test]
fn without_members_nothing_is_assigned() {
    assert_eq!(assign(&[], &owners(&[Some("a"), None])), vec![None, None]);
}

#[test]
fn keys_start_with_the_stream_name() {
    let k = Keys::new("oxbus:events", "billing", 2);
    assert_eq!(k.members, "oxbus:events:group:billing:members");
    assert_eq!(k.meta, "oxbus:events:group:billing:meta");
    assert_eq!(
        k.leases,
        names(&[
            "oxbus:events:group:billing:lease:0",
            "oxbus:events:group:billing:lease:1"
        ])
    );
}

#[test]
fn without_leases_every_partition_is_read_and_claimed() {
    let t = Table::new(3, false);
    assert_eq!(t.start_read(), vec![0, 1, 2]);
    assert_eq!(t.start_claim(), vec![0, 1, 2]);
}

#[test]
fn a_leased_partition_is_read_only_once_taken_over() {
    let t = Table::new(2, true);
    assert!(t.start_read().is_empty() && t.owned().is_empty());
    t.acquired(1);
    assert_eq!(t.owned(), vec![1]);
    assert!(
        t.start_read().is_empty(),
        "read before its pending entries were claimed"
    );
    t.open(1);
    assert_eq!(t.start_read(), vec![1]);
}

#[test]
fn a_partition_given_up_is_quiet_only_when_no_read_is_under_way_and_all_is_acknowledged() {
    let t = Table::new(2, true);
    t.acquired(0);
    t.open(0);
    let read = t.start_read();
    assert!(
        !t.close(0),
        "quiet while a read that includes it is under way"
    );
    assert!(t.start_read().is_empty(), "closed: no new read includes it");
    t.delivered(&[3, 0]);
    t.end_read(&read);
    assert!(!t.close(0), "quiet with 3 entries unacknowledged");
    t.settled(&[2, 0]);
    assert!(!t.close(0));
    t.settled(&[1, 0]);
    assert!(t.close(0), "quiet: nothing read, nothing in flight");
    t.open(0);
    let (claim, read) = (t.start_claim(), t.start_read());
    t.end_read(&read);
    assert!(!t.close(0), "quiet while the claimer is at it");
    t.end_read(&claim);
    assert!(t.close(0));
    t.dropped(0);
    assert!(t.owned().is_empty());
}

// ------------------------------------------------------------------ against the real Redis

const URL: &str = "redis://127.0.0.1:6379/0";

fn redis_up() -> bool {
    if std::net::TcpStream::connect("127.0.0.1:6379").is_ok() {
        return true;
    }
    assert!(
        std::env::var("OXBUS_CI").as_deref() != Ok("1"),
        "OXBUS_CI=1 forbids skipping: Redis at 127.0.0.1:6379 is unreachable"
    );
    eprintln!("skipped: Redis at 127.0.0.1:6379 is unreachable");
    false
}

struct Drop_;

impl Sink for Drop_ {
    fn confirmed(&self, _: Vec<Confirm>) {}
    fn delivered(&self, _: Vec<Message>) {}
}

fn leased(stream: &str, consumer: &str) -> Config {
    Config {
        url: URL.into(),
        streams: (0..4).map(|i| format!("{stream}:{i}")).collect(),
        group: "g".into(),
        consumer: consumer.into(),
        claim_idle: Duration::from_secs(30),
        maxlen: 0,
        batch: 16,
        prefetch: 64,
        max_deliveries: 3,
        dead_stream: format!("{stream}:dead"),
        publish_timeout: Duration::from_secs(5),
        consume: true,
        leases: Some(LeaseConfig {
            stream: stream.into(),
            ttl: Duration::from_millis(600),
        }),
    }
}

/// Polls `t`'s health until `pred` holds (10 s at most).
fn until(
    rt: &tokio::runtime::Runtime,
    t: &RedisStreams,
    what: &str,
    pred: impl Fn(&Vec<usize>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pred(&t.health().owned) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            t.health()
        );
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
    }
}

#[test]
fn two_leased_members_split_four_partitions_and_one_stopping_hands_its_own_over() {
    if !redis_up() {
        return;
    }
    let stream = format!("oxbus-test:rust-leases:{}", uuid::Uuid::new_v4().simple());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let member = |consumer: &str| {
        rt.block_on(RedisStreams::connect(
            leased(&stream, consumer),
            Arc::new(Drop_),
            rt.handle().clone(),
        ))
        .expect("connects")
    };
    let a = member("a");
    until(&rt, &a, "a alone to hold all four", |o| o.len() == 4);
    let b = member("b");
    until(&rt, &b, "b to hold two", |o| o.len() == 2);
    until(&rt, &a, "a to give two up", |o| o.len() == 2);
    let (ha, hb) = (a.health(), b.health());
    assert!(
        ha.owned.iter().all(|p| !hb.owned.contains(p)),
        "{ha:?} {hb:?}"
    );
    assert_eq!(hb.members, names(&["a", "b"]));
    rt.block_on(b.stop());
    // Released at stop: a takes them over well before the TTL would have run out twice.
    until(&rt, &a, "a to hold all four again", |o| o.len() == 4);
    let view = rt.block_on(read_group(URL, &stream, "g")).expect("reads");
    assert_eq!(view.partitions, 4);
    assert_eq!(
        view.members
            .iter()
            .map(|(m, _)| m.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    assert!(
        view.owners
            .iter()
            .all(|o| o.as_ref().is_some_and(|(h, _)| h == "a")),
        "{view:?}"
    );
    rt.block_on(a.stop());
    let view = rt.block_on(read_group(URL, &stream, "g")).expect("reads");
    assert!(
        view.members.is_empty() && view.owners.iter().all(Option::is_none),
        "{view:?}"
    );
    rt.block_on(async {
        let client = Client::open(URL).expect("url");
        let mut c = connect(&client).await.expect("connects");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{stream}*"))
            .query_async(&mut c)
            .await
            .expect("KEYS");
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut c)
                .await
                .expect("DEL");
        }
    });
}
