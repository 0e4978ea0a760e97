//! Partition leases: with `partitions=N`, each partition stream of a consumer group is read by
//! one live member at a time, so a key's events are handled in order across processes (the
//! consumer-group guarantee of a partitioned log).
//!
//! Redis holds, per stream and group (see [`Keys`]):
//! - a lease per partition: a string key holding the owner's consumer name, with a TTL. It is
//!   taken with `SET NX PX`, renewed only by its owner and released only by its owner (small
//!   compare-and-set Lua scripts), so two members never both hold one;
//! - the members: a sorted set of consumer names scored by the server time (ms) at which their
//!   membership lapses, refreshed by every member's heartbeat, pruned by every heartbeat;
//! - the group's settings (partitions, lease TTL) for `oxbus health redis://...`.
//!
//! Every member runs the same pure [`assign`] over the live members and the current owners, so
//! all agree on who should own what without talking to each other. A member gives a partition
//! up only once it no longer reads it and every entry it read from it is acknowledged; the new
//! owner claims what is still pending there (entries of a member that died) and hands those on
//! before it reads new entries. Per-key order therefore holds across a hand-over as long as a
//! member renews its leases within the TTL (a member stalled longer than that may lose a
//! partition while it still handles entries of it: the same limit as Kafka's session timeout).
//!
//! [`keep`] is the task that runs the heartbeat; the transport provides the rest through
//! [`Holder`] and tracks what each partition is doing in a [`Table`].

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisResult, Value};
use tokio::sync::Notify;

/// Settings of the leases of a partitioned group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The base stream name (the partitions are `<stream>:<i>`); the lease keys derive from it.
    pub stream: String,
    /// How long a lease and a membership last without a heartbeat. The heartbeat runs every
    /// third of it (every second at most); a dead member's partitions move after at most
    /// this long.
    pub ttl: Duration,
}

/// The Redis keys of a group's leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// Sorted set: member name -> server time (ms) its membership lapses.
    pub members: String,
    /// Hash: `partitions`, `lease_ttl_ms` (what `oxbus health` reads).
    pub meta: String,
    /// One lease key per partition.
    pub leases: Vec<String>,
}

impl Keys {
    /// The keys of `group` over `partitions` partitions of `stream` (all start with the stream
    /// name, as the partitions and the dead-letter stream do).
    pub fn new(stream: &str, group: &str, partitions: usize) -> Self {
        let base = format!("{stream}:group:{group}");
        Self {
            members: format!("{base}:members"),
            meta: format!("{base}:meta"),
            leases: (0..partitions)
                .map(|i| format!("{base}:lease:{i}"))
                .collect(),
        }
    }
}

/// The even assignment of `owners.len()` partitions to `members` (sorted, without
/// duplicates): for each partition, the index of the member that should own it (`None` only
/// when there are no members).
///
/// Even: every member gets `n / m` or one more. Sticky: a partition stays with its current
/// owner while that owner is live and within its share, so a member joining or leaving moves
/// only the partitions that must move. Deterministic, so every member computes the same, and
/// a fixed point: once the owners are what it says, it says the same again.
pub fn assign(members: &[String], owners: &[Option<String>]) -> Vec<Option<usize>> {
    let (n, m) = (owners.len(), members.len());
    let mut out = vec![None; n];
    if m == 0 {
        return out;
    }
    let base = n / m;
    let mut extra = n % m; // members that may own base + 1
    let mut count = vec![0usize; m];
    let owner: Vec<Option<usize>> = owners
        .iter()
        .map(|o| o.as_ref().and_then(|o| members.iter().position(|x| x == o)))
        .collect();
    // 1. Current owners keep up to their base share.
    for p in 0..n {
        if let Some(k) = owner[p] {
            if count[k] < base {
                out[p] = Some(k);
                count[k] += 1;
            }
        }
    }
    // 2. Owners holding more keep one more, while the extra shares last (in member order).
    for (k, c) in count.iter_mut().enumerate() {
        if extra == 0 {
            break;
        }
        if *c == base {
            if let Some(p) = (0..n).find(|&p| out[p].is_none() && owner[p] == Some(k)) {
                out[p] = Some(k);
                *c += 1;
                extra -= 1;
            }
        }
    }
    // 3. The rest fill the members below their base share first, then the extra shares.
    for slot in &mut out {
        if slot.is_some() {
            continue;
        }
        let k = if let Some(k) = (0..m).find(|&k| count[k] < base) {
            k
        } else {
            // n = m * base + extra: a partition left over means an extra share is left.
            extra = extra.saturating_sub(1);
            (0..m).find(|&k| count[k] == base).unwrap_or(0)
        };
        *slot = Some(k);
        count[k] += 1;
    }
    out
}

/// What one partition is doing in this member.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Part {
    /// This member holds its lease (always, without leases).
    owned: bool,
    /// The reader may read it (owned, and its pending entries were taken over).
    readable: bool,
    /// Reads (or claims) under way that include it.
    reading: usize,
    /// Entries read from it and not yet acknowledged.
    in_flight: usize,
}

/// Per-partition state shared by the reader, the acker, the claimer and the lease keeper.
#[derive(Debug)]
pub struct Table {
    parts: Mutex<Vec<Part>>,
    /// Signalled when a partition becomes readable.
    pub changed: Notify,
}

impl Table {
    /// `n` partitions; `leased`: each must be leased before it is read, else all are readable.
    pub fn new(n: usize, leased: bool) -> Self {
        let p = Part {
            owned: !leased,
            readable: !leased,
            ..Part::default()
        };
        Self {
            parts: Mutex::new(vec![p; n]),
            changed: Notify::new(),
        }
    }

    /// The partitions one read may include, now marked as being read: a partition the keeper
    /// gives up is not released before [`Table::end_read`].
    pub fn start_read(&self) -> Vec<usize> {
        let mut parts = self.parts.lock();
        parts
            .iter_mut()
            .enumerate()
            .filter(|(_, p)| p.readable)
            .map(|(i, p)| {
                p.reading += 1;
                i
            })
            .collect()
    }

    /// The read (or claim) of `read` is over (what it delivered was counted with
    /// [`Table::delivered`] before).
    pub fn end_read(&self, read: &[usize]) {
        let mut parts = self.parts.lock();
        for &i in read {
            parts[i].reading = parts[i].reading.saturating_sub(1);
        }
    }

    /// Entries handed on: `delivered[i]` of partition `i`. Counted before they are handed on,
    /// so an acknowledgement never comes first.
    pub fn delivered(&self, delivered: &[usize]) {
        let mut parts = self.parts.lock();
        for (p, &n) in parts.iter_mut().zip(delivered) {
            p.in_flight += n;
        }
    }

    /// Entries acknowledged: `settled[i]` of partition `i`.
    pub fn settled(&self, settled: &[usize]) {
        let mut parts = self.parts.lock();
        for (p, &n) in parts.iter_mut().zip(settled) {
            p.in_flight = p.in_flight.saturating_sub(n);
        }
    }

    /// Entries of partition `i` handed on and not yet acknowledged.
    pub fn in_flight(&self, i: usize) -> usize {
        self.parts.lock()[i].in_flight
    }

    /// The partitions the periodic claimer looks after (owned and readable), now marked as
    /// being read: `end_read` each when its claim is over.
    pub fn start_claim(&self) -> Vec<usize> {
        let mut parts = self.parts.lock();
        parts
            .iter_mut()
            .enumerate()
            .filter(|(_, p)| p.owned && p.readable)
            .map(|(i, p)| {
                p.reading += 1;
                i
            })
            .collect()
    }

    /// The partitions this member holds.
    pub fn owned(&self) -> Vec<usize> {
        let parts = self.parts.lock();
        (0..parts.len()).filter(|&i| parts[i].owned).collect()
    }

    fn is_owned(&self, i: usize) -> bool {
        self.parts.lock()[i].owned
    }

    /// The lease of `i` was taken: owned, not yet readable (its pending entries come first).
    fn acquired(&self, i: usize) {
        let mut parts = self.parts.lock();
        parts[i].owned = true;
        parts[i].readable = false;
    }

    /// Partition `i` may be read (again).
    fn open(&self, i: usize) {
        self.parts.lock()[i].readable = true;
        self.changed.notify_waiters();
    }

    /// No new reads of `i`; true once it is quiet: no read under way, nothing in flight.
    fn close(&self, i: usize) -> bool {
        let mut parts = self.parts.lock();
        let p = &mut parts[i];
        p.readable = false;
        p.reading == 0 && p.in_flight == 0
    }

    /// The lease of `i` is gone (released, or lost): not owned, not read.
    fn dropped(&self, i: usize) {
        let mut parts = self.parts.lock();
        parts[i].owned = false;
        parts[i].readable = false;
    }
}

/// What the lease keeper needs from its transport.
pub trait Holder: Send + Sync + 'static {
    /// The transport's partition table.
    fn table(&self) -> &Table;
    /// Whether the transport is pausing or stopped: it takes no new partitions then (it keeps
    /// and renews those it has until `stop` releases them).
    fn ending(&self) -> bool;
    /// Claims every entry of partition `i` still pending in the group on other members (and
    /// on this one when `own`: left by an earlier run with the same name), in id order, and
    /// hands them on. Runs before the partition is read.
    fn take_over(
        &self,
        conn: &mut MultiplexedConnection,
        i: usize,
        own: bool,
    ) -> impl Future<Output = RedisResult<()>> + Send;
    /// The latest view: live members, and each partition's owner.
    fn report(&self, members: Vec<String>, owners: Vec<Option<String>>);
    /// A command failed.
    fn failed(&self, e: &redis::RedisError);
}

/// Heartbeat: refreshes this member, prunes lapsed members, records the settings, and returns
/// the live members and each lease's holder. The clock is the server's (`TIME`), so members on
/// machines whose clocks disagree still agree on who is live.
const HEARTBEAT: &str = r"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('HSET', KEYS[2], 'partitions', ARGV[3], 'lease_ttl_ms', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ttl * 2)
local owners = {}
for i = 3, #KEYS do owners[#owners + 1] = redis.call('GET', KEYS[i]) or '' end
return {redis.call('ZRANGE', KEYS[1], 0, -1), owners}
";

/// Renews a lease only if this member still holds it.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Releases a lease only if this member holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// What a round does with one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Acquire,
    Renew,
    Release,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

async fn connect(client: &Client) -> RedisResult<MultiplexedConnection> {
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
}

/// Runs [`HEARTBEAT`]: (live members sorted, holder of each lease).
async fn heartbeat(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    me: &str,
    ttl: Duration,
) -> RedisResult<(Vec<String>, Vec<Option<String>>)> {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(HEARTBEAT)
        .arg(2 + keys.leases.len())
        .arg(&keys.members)
        .arg(&keys.meta)
        .arg(&keys.leases)
        .arg(me)
        .arg(millis(ttl))
        .arg(keys.leases.len());
    let (mut members, owners): (Vec<String>, Vec<String>) = cmd.query_async(conn).await?;
    members.sort();
    members.dedup();
    let owners = owners
        .into_iter()
        .map(|o| Some(o).filter(|o| !o.is_empty()))
        .collect();
    Ok((members, owners))
}

/// Applies `ops` in one round trip: for each, whether this member holds the lease after it
/// (always false for a release).
async fn apply(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    me: &str,
    ttl: Duration,
    ops: &[(usize, Op)],
) -> RedisResult<Vec<bool>> {
    let ms = millis(ttl);
    let mut pipe = redis::pipe();
    for &(i, op) in ops {
        let key = &keys.leases[i];
        match op {
            // SET NX PX; or still ours (a restart under the same name before it lapsed).
            Op::Acquire => {
                pipe.cmd("SET").arg(key).arg(me).arg("NX").arg("PX").arg(ms);
                pipe.cmd("EVAL").arg(RENEW).arg(1).arg(key).arg(me).arg(ms);
            }
            Op::Renew => {
                pipe.cmd("EVAL").arg(RENEW).arg(1).arg(key).arg(me).arg(ms);
            }
            Op::Release => {
                pipe.cmd("EVAL").arg(RELEASE).arg(1).arg(key).arg(me);
            }
        }
    }
    let replies: Vec<Value> = pipe.query_async(conn).await?;
    let mut replies = replies.into_iter();
    let mut yes = || matches!(replies.next(), Some(Value::Okay | Value::Int(1)));
    Ok(ops
        .iter()
        .map(|&(_, op)| match op {
            Op::Acquire => {
                let set = yes();
                yes() || set
            }
            Op::Renew => yes(),
            Op::Release => {
                yes();
                false
            }
        })
        .collect())
}

/// Releases the leases of `owned` and leaves the members (at `stop`): the others take the
/// partitions over at once instead of after the TTL.
pub async fn leave(client: &Client, keys: &Keys, me: &str, owned: &[usize]) -> RedisResult<()> {
    let mut conn = connect(client).await?;
    let mut pipe = redis::pipe();
    for &i in owned {
        pipe.cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(&keys.leases[i])
            .arg(me)
            .ignore();
    }
    pipe.cmd("ZREM").arg(&keys.members).arg(me).ignore();
    pipe.query_async::<()>(&mut conn).await
}

/// The lease keeper of one member: every third of the TTL but at least every second (more
/// often while a hand-over is under way; a member joining is seen within a second whatever
/// the TTL) it refreshes its membership, computes the assignment, takes the partitions it
/// should own (their pending entries first), renews those it keeps, and gives up the others
/// once they are quiet. Runs until aborted; `leave` then releases what it holds.
pub async fn keep<H: Holder>(
    holder: Arc<H>,
    client: Client,
    keys: Keys,
    me: String,
    ttl: Duration,
) {
    let period = (ttl / 3).min(Duration::from_secs(1));
    let quick = period.min(Duration::from_millis(100));
    let table = holder.table();
    let mut conn: Option<MultiplexedConnection> = None;
    let mut renewed = Instant::now();
    loop {
        let busy = match round(&*holder, &client, &mut conn, &keys, &me, ttl).await {
            Ok(busy) => {
                renewed = Instant::now();
                busy
            }
            Err(e) => {
                holder.failed(&e);
                conn = None;
                if renewed.elapsed() >= ttl {
                    // Unrenewed for a whole TTL: another member may hold them by now.
                    for i in table.owned() {
                        table.dropped(i);
                    }
                }
                true
            }
        };
        tokio::time::sleep(if busy { quick } else { period }).await;
    }
}

/// One round; true while a hand-over is under way (a partition wanted but held elsewhere, or
/// given up and not yet quiet).
async fn round<H: Holder>(
    holder: &H,
    client: &Client,
    conn: &mut Option<MultiplexedConnection>,
    keys: &Keys,
    me: &str,
    ttl: Duration,
) -> RedisResult<bool> {
    let table = holder.table();
    if conn.is_none() {
        *conn = Some(connect(client).await?);
    }
    let c = conn.as_mut().expect("connected above");
    let (members, owners) = heartbeat(c, keys, me, ttl).await?;
    let target = assign(&members, &owners);
    let mine = members.iter().position(|m| m == me);
    let ending = holder.ending();
    let mut ops = Vec::new();
    let mut busy = false;
    for (i, t) in target.iter().enumerate() {
        let want = mine.is_some() && *t == mine;
        match (table.is_owned(i), want) {
            (true, true) => ops.push((i, Op::Renew)),
            (true, false) if ending => ops.push((i, Op::Renew)),
            (true, false) => {
                if table.close(i) {
                    ops.push((i, Op::Release));
                } else {
                    ops.push((i, Op::Renew)); // kept while what was read from it finishes
                    busy = true;
                }
            }
            (false, true) if !ending => ops.push((i, Op::Acquire)),
            (false, _) => {}
        }
    }
    let held = apply(c, keys, me, ttl, &ops).await?;
    for (&(i, op), held) in ops.iter().zip(held) {
        match (op, held) {
            (Op::Acquire, true) => {
                table.acquired(i);
                let own = table.in_flight(i) == 0;
                if let Err(e) = holder.take_over(c, i, own).await {
                    // Still leased to this member: the next round takes it over again.
                    table.dropped(i);
                    return Err(e);
                }
                table.open(i);
            }
            (Op::Acquire, false) => busy = true, // its owner is still handing it over
            (Op::Renew, true) => {
                if target[i].is_some() && target[i] == mine && !ending {
                    table.open(i); // wanted again while it was being given up
                }
            }
            (Op::Renew | Op::Release, _) => table.dropped(i),
        }
    }
    let mut owners = owners;
    for (i, o) in owners.iter_mut().enumerate() {
        // This member's own part of the view is what it holds after this round.
        let ours = table.is_owned(i);
        if ours {
            *o = Some(me.to_owned());
        } else if o.as_deref() == Some(me) {
            *o = None;
        }
    }
    holder.report(members, owners);
    Ok(busy)
}

/// What `oxbus health redis://...` shows of a group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupView {
    /// Partitions, as the live members recorded them (0: no member is live).
    pub partitions: usize,
    /// Their lease TTL in ms.
    pub lease_ttl_ms: u64,
    /// Live members (by name) and the ms left before their membership lapses.
    pub members: Vec<(String, i64)>,
    /// Each partition's lease holder and the ms left on its lease.
    pub owners: Vec<Option<(String, i64)>>,
}

/// Reads a group's members and leases (for the command line; changes nothing).
pub async fn read_group(url: &str, stream: &str, group: &str) -> RedisResult<GroupView> {
    let client = Client::open(url)?;
    let mut c = connect(&client).await?;
    let keys = Keys::new(stream, group, 0);
    let meta: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
        .arg(&keys.meta)
        .query_async(&mut c)
        .await?;
    let n = usize::try_from(meta.get("partitions").copied().unwrap_or(0)).unwrap_or(0);
    let keys = Keys::new(stream, group, n);
    let (time, members): ((i64, i64), Vec<(String, f64)>) = redis::pipe()
        .cmd("TIME")
        .cmd("ZRANGE")
        .arg(&keys.members)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut c)
        .await?;
    let now = time.0 * 1000 + time.1 / 1000;
    #[allow(clippy::cast_possible_truncation)]
    let mut members: Vec<(String, i64)> = members
        .into_iter()
        .map(|(m, expires)| (m, expires as i64 - now))
        .filter(|(_, left)| *left > 0)
        .collect();
    members.sort();
    let mut owners = Vec::with_capacity(n);
    if n > 0 {
        let holders: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys.leases)
            .query_async(&mut c)
            .await?;
        let mut pipe = redis::pipe();
        for k in &keys.leases {
            pipe.cmd("PTTL").arg(k);
        }
        let left: Vec<i64> = pipe.query_async(&mut c).await?;
        owners.extend(
            holders
                .into_iter()
                .zip(left)
                .map(|(h, left)| h.map(|h| (h, left))),
        );
    }
    Ok(GroupView {
        partitions: n,
        lease_ttl_ms: meta.get("lease_ttl_ms").copied().unwrap_or(0),
        members,
        owners,
    })
}

#[cfg(test)]
mod tests;
