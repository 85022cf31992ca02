//! A bounded cache of forwarded answers, each kept for its smallest TTL (negative answers for
//! their SOA's minimum, RFC 2308) and never longer than `max_cache_ttl`. Full → the oldest entry
//! goes. Served answers carry the TTL left, so a client never caches past the upstream's TTL.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{DNSClass, RData, RecordType},
};
use tokio::time::Instant;

/// What makes two questions the same answer: name, type, class, and the EDNS bits that change
/// the answer's shape (an OPT record in the reply, DNSSEC records, checking disabled).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    pub name: String,
    pub qtype: RecordType,
    pub qclass: DNSClass,
    pub edns: bool,
    pub dnssec_ok: bool,
    pub checking_disabled: bool,
}

impl Key {
    /// The key of a query with exactly one question.
    pub fn of(query: &Message) -> Option<Self> {
        let [q] = query.queries.as_slice() else {
            return None;
        };
        Some(Self {
            name: q.name().to_lowercase().to_ascii(),
            qtype: q.query_type(),
            qclass: q.query_class(),
            edns: query.edns.is_some(),
            dnssec_ok: query.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
            checking_disabled: query.metadata.checking_disabled,
        })
    }
}

struct Entry {
    answer: Message,
    /// Which slot of `order` is this entry's (older slots of a replaced key are stale).
    seq: u64,
    stored: Instant,
    expires: Instant,
}

pub struct Cache {
    entries: HashMap<Key, Entry>,
    /// Insertion order, for eviction; may hold stale slots of keys replaced or removed.
    order: VecDeque<(Key, u64)>,
    seq: u64,
}

impl Default for Cache {
    fn default() -> Self {
        Self::new()
    }
}

impl Cache {
    pub fn new() -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            seq: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cached answer for `key` with its TTLs lowered by the time it spent here, and `id`.
    pub fn get(&mut self, key: &Key, id: u16, now: Instant) -> Option<Message> {
        let entry = self.entries.get(key)?;
        if now >= entry.expires {
            self.entries.remove(key);
            return None;
        }
        let age = u32::try_from(now.duration_since(entry.stored).as_secs()).unwrap_or(u32::MAX);
        let mut answer = entry.answer.clone();
        answer.metadata.id = id;
        for r in answer
            .answers
            .iter_mut()
            .chain(answer.authorities.iter_mut())
            .chain(answer.additionals.iter_mut())
        {
            r.ttl = r.ttl.saturating_sub(age);
        }
        Some(answer)
    }

    /// Keeps `answer` if it may be cached: a complete NOERROR or NXDOMAIN with a TTL above 0.
    pub fn insert(
        &mut self,
        key: Key,
        answer: Message,
        capacity: usize,
        max_ttl: Duration,
        now: Instant,
    ) {
        if capacity == 0 {
            return;
        }
        let Some(ttl) = cache_ttl(&answer) else {
            return;
        };
        let ttl = Duration::from_secs(u64::from(ttl)).min(max_ttl);
        if ttl.is_zero() {
            return;
        }
        while self.entries.len() >= capacity && !self.entries.contains_key(&key) {
            // Evict the oldest entry still present (stale order slots are skipped).
            let Some((old, seq)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&old).is_some_and(|e| e.seq == seq) {
                self.entries.remove(&old);
            }
        }
        // Stale slots (replaced or expired keys) would let `order` outgrow the entries: compact.
        if self.order.len() > capacity.saturating_mul(2) {
            let entries = &self.entries;
            self.order
                .retain(|(k, seq)| entries.get(k).is_some_and(|e| e.seq == *seq));
        }
        self.seq += 1;
        self.order.push_back((key.clone(), self.seq));
        self.entries.insert(
            key,
            Entry {
                answer,
                seq: self.seq,
                stored: now,
                expires: now + ttl,
            },
        );
    }
}

/// How long an answer may be cached, if at all (RFC 2308 for negative answers).
fn cache_ttl(answer: &Message) -> Option<u32> {
    if answer.metadata.truncation {
        return None;
    }
    match answer.metadata.response_code {
        ResponseCode::NoError if !answer.answers.is_empty() => {
            answer.answers.iter().map(|r| r.ttl).min()
        }
        // NODATA or NXDOMAIN: the SOA in the authority section says for how long.
        ResponseCode::NoError | ResponseCode::NXDomain => {
            answer.authorities.iter().find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::{
        op::{MessageType, OpCode, Query},
        rr::{Name, Record, rdata::A},
    };

    use super::*;

    fn answer(name: &str, ttl: u32) -> (Key, Message) {
        let n = Name::from_ascii(name).expect("name");
        let mut q = Message::new(1, MessageType::Query, OpCode::Query);
        q.add_query(Query::query(n.clone(), RecordType::A));
        let key = Key::of(&q).expect("one question");
        let mut a = Message::new(1, MessageType::Response, OpCode::Query);
        a.add_query(Query::query(n.clone(), RecordType::A));
        a.add_answer(Record::from_rdata(
            n,
            ttl,
            RData::A(A(Ipv4Addr::new(198, 18, 0, 1))),
        ));
        (key, a)
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_with_their_ttl_and_ttls_count_down() {
        let mut c = Cache::new();
        let (key, a) = answer("a.example.", 10);
        let t0 = Instant::now();
        c.insert(key.clone(), a, 16, Duration::from_secs(300), t0);
        let hit = c
            .get(&key, 77, t0 + Duration::from_secs(4))
            .expect("cached");
        assert_eq!(hit.metadata.id, 77);
        assert_eq!(hit.answers[0].ttl, 6);
        assert!(c.get(&key, 1, t0 + Duration::from_secs(10)).is_none());
        assert!(c.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn max_ttl_caps_and_zero_ttl_is_not_cached() {
        let mut c = Cache::new();
        let t0 = Instant::now();
        let (key, a) = answer("a.example.", 86400);
        c.insert(key.clone(), a, 16, Duration::from_secs(5), t0);
        assert!(c.get(&key, 1, t0 + Duration::from_secs(4)).is_some());
        assert!(c.get(&key, 1, t0 + Duration::from_secs(5)).is_none());
        let (key, a) = answer("b.example.", 0);
        c.insert(key.clone(), a, 16, Duration::from_secs(5), t0);
        assert!(c.get(&key, 1, t0).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn capacity_is_a_hard_bound_oldest_out_first() {
        let mut c = Cache::new();
        let t0 = Instant::now();
        for i in 0..1000 {
            let (key, a) = answer(&format!("n{i}.example."), 60);
            c.insert(key, a, 8, Duration::from_secs(300), t0);
            assert!(c.len() <= 8);
            assert!(c.order.len() <= 17);
        }
        let (newest, _) = answer("n999.example.", 60);
        let (oldest, _) = answer("n0.example.", 60);
        assert!(c.get(&newest, 1, t0).is_some());
        assert!(c.get(&oldest, 1, t0).is_none());
        // Replacing one key over and over keeps the order queue bounded too.
        for _ in 0..1000 {
            let (key, a) = answer("same.example.", 60);
            c.insert(key, a, 8, Duration::from_secs(300), t0);
            assert!(c.order.len() <= 17, "{}", c.order.len());
        }
    }
}
