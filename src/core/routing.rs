//! Subscriptions and how an event finds its handlers.
//!
//! A subscription matches by class (the event's class or one of its bases, given as opaque
//! ids in method resolution order), by exact type key, or by an AMQP-style topic pattern
//! (`*` = exactly one dot-separated word, `#` = zero or more). Resolved routes are sorted by
//! priority (smaller first), ties in subscription order. Callers cache routes per class; the
//! router's `generation` changes whenever the subscription set changes, so caches know when
//! to drop what they hold.

use std::sync::Arc;

use crate::core::stats::SubCounters;
use crate::core::{CoreError, Result};

/// How a subscription recognises an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// The event's class or a subclass: the id of the class.
    Class(usize),
    /// The event's type key, exactly.
    Exact(String),
    /// A dotted topic pattern with `*` and `#` words.
    Pattern(Topic),
}

impl Matcher {
    /// A matcher for a string: a pattern when a word is `*` or `#`, else an exact key.
    pub fn for_str(s: &str) -> Result<Self> {
        if s.split('.').any(|w| w == "*" || w == "#") {
            Ok(Self::Pattern(Topic::parse(s)?))
        } else if s.is_empty() {
            Err(CoreError::InvalidPattern {
                pattern: s.to_owned(),
                reason: "it is empty",
            })
        } else {
            Ok(Self::Exact(s.to_owned()))
        }
    }

    /// Whether an event with this type key and these class ids (its class first) matches.
    pub fn matches(&self, type_key: &str, mro: &[usize]) -> bool {
        match self {
            Self::Class(id) => mro.contains(id),
            Self::Exact(s) => s == type_key,
            Self::Pattern(t) => t.matches(type_key),
        }
    }

    /// Whether matching needs the event's type key (class matchers do not).
    pub fn needs_type_key(&self) -> bool {
        !matches!(self, Self::Class(_))
    }
}

/// One word of a topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Word {
    Literal(String),
    One,
    Any,
}

/// An AMQP topic pattern: `order.*`, `#.failed`, `billing.#`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    source: String,
    words: Vec<Word>,
}

impl Topic {
    /// Parses a dotted pattern; empty words (`a..b`) are refused.
    pub fn parse(pattern: &str) -> Result<Self> {
        let mut words = Vec::new();
        for w in pattern.split('.') {
            words.push(match w {
                "" => {
                    return Err(CoreError::InvalidPattern {
                        pattern: pattern.to_owned(),
                        reason: "it has an empty word (two dots in a row, or a dot at an end)",
                    })
                }
                "*" => Word::One,
                "#" => Word::Any,
                lit => Word::Literal(lit.to_owned()),
            });
        }
        Ok(Self {
            source: pattern.to_owned(),
            words,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether a dotted type key matches.
    pub fn matches(&self, key: &str) -> bool {
        let parts: Vec<&str> = key.split('.').collect();
        match_words(&self.words, &parts)
    }
}

fn match_words(pat: &[Word], key: &[&str]) -> bool {
    match pat.split_first() {
        None => key.is_empty(),
        Some((Word::Any, rest)) => (0..=key.len()).any(|skip| match_words(rest, &key[skip..])),
        Some((Word::One, rest)) => !key.is_empty() && match_words(rest, &key[1..]),
        Some((Word::Literal(l), rest)) => {
            key.first() == Some(&l.as_str()) && match_words(rest, &key[1..])
        }
    }
}

/// A subscription: how it matches, its order, and the caller's payload (the handler).
#[derive(Debug)]
pub struct Subscription<H> {
    /// Unique within one router, never reused.
    pub id: u64,
    /// What it listens to.
    pub matcher: Matcher,
    /// Smaller runs first.
    pub priority: i64,
    /// The subscription's name (for statistics, dead letters, durable progress).
    pub name: Arc<str>,
    /// Its calls, failures and dead letters, shared by the subscriptions of one name.
    pub counters: Arc<SubCounters>,
    /// Whatever the caller attaches: the handler and its settings.
    pub payload: H,
}

/// The subscription table.
#[derive(Debug)]
pub struct Router<H> {
    subs: Vec<Arc<Subscription<H>>>,
    next_id: u64,
    generation: u64,
    string_subs: usize,
}

impl<H> Default for Router<H> {
    fn default() -> Self {
        Self {
            subs: Vec::new(),
            next_id: 1,
            generation: 0,
            string_subs: 0,
        }
    }
}

impl<H> Router<H> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a subscription and returns it (`Engine::subscribe` passes the counters its
    /// statistics keep for `name`).
    pub fn subscribe(
        &mut self,
        matcher: Matcher,
        priority: i64,
        name: Arc<str>,
        counters: Arc<SubCounters>,
        payload: H,
    ) -> Arc<Subscription<H>> {
        let id = self.next_id;
        self.next_id += 1;
        if matcher.needs_type_key() {
            self.string_subs += 1;
        }
        let sub = Arc::new(Subscription {
            id,
            matcher,
            priority,
            name,
            counters,
            payload,
        });
        self.subs.push(Arc::clone(&sub));
        self.generation += 1;
        sub
    }

    /// Removes a subscription by id; false when there was none.
    pub fn unsubscribe(&mut self, id: u64) -> bool {
        let Some(pos) = self.subs.iter().position(|s| s.id == id) else {
            return false;
        };
        let sub = self.subs.remove(pos);
        if sub.matcher.needs_type_key() {
            self.string_subs -= 1;
        }
        self.generation += 1;
        true
    }

    /// Changes whenever the table changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether any subscription matches on the type key (so callers must compute it).
    pub fn needs_type_key(&self) -> bool {
        self.string_subs > 0
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.subs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// All subscriptions in subscription order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Subscription<H>>> {
        self.subs.iter()
    }

    /// The subscriptions an event reaches, smaller priority first, ties in subscription order.
    pub fn resolve(&self, type_key: &str, mro: &[usize]) -> Vec<Arc<Subscription<H>>> {
        let mut out: Vec<Arc<Subscription<H>>> = self
            .subs
            .iter()
            .filter(|s| s.matcher.matches(type_key, mro))
            .cloned()
            .collect();
        // Stable sort: equal priorities keep subscription order.
        out.sort_by_key(|s| s.priority);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_matches_exactly_one_word() {
        let t = Topic::parse("order.*").unwrap();
        assert!(t.matches("order.placed"));
        assert!(!t.matches("order"));
        assert!(!t.matches("order.placed.late"));
    }

    #[test]
    fn hash_matches_zero_or_more_words() {
        let t = Topic::parse("order.#").unwrap();
        assert!(t.matches("order"));
        assert!(t.matches("order.placed.late"));
        assert!(!t.matches("billing.order"));
        assert!(Topic::parse("#.failed").unwrap().matches("a.b.failed"));
        assert!(Topic::parse("#").unwrap().matches("anything.at.all"));
    }

    #[test]
    fn empty_words_are_refused_with_the_pattern_named() {
        let err = Topic::parse("order..*").unwrap_err();
        assert!(err.to_string().contains("\"order..*\""), "{err}");
        assert!(Matcher::for_str("").is_err());
    }

    #[test]
    fn strings_without_wildcards_match_exactly() {
        assert_eq!(
            Matcher::for_str("OrderPlaced").unwrap(),
            Matcher::Exact("OrderPlaced".into())
        );
        assert!(matches!(
            Matcher::for_str("a.*").unwrap(),
            Matcher::Pattern(_)
        ));
    }

    #[test]
    fn smaller_priority_runs_first_and_ties_keep_subscription_order() {
        let mut r = Router::new();
        r.subscribe(Matcher::Class(7), 5, "late".into(), Arc::default(), ());
        r.subscribe(Matcher::Class(7), 1, "first".into(), Arc::default(), ());
        r.subscribe(
            Matcher::Exact("T".into()),
            1,
            "second".into(),
            Arc::default(),
            (),
        );
        let names: Vec<_> = r
            .resolve("T", &[7, 1])
            .iter()
            .map(|s| s.name.to_string())
            .collect();
        assert_eq!(names, ["first", "second", "late"]);
    }

    #[test]
    fn class_matchers_see_bases_but_not_the_type_key() {
        let mut r = Router::new();
        r.subscribe(Matcher::Class(1), 1, "base".into(), Arc::default(), ());
        assert_eq!(r.resolve("Whatever", &[2, 1]).len(), 1);
        assert_eq!(r.resolve("1", &[3]).len(), 0);
        assert!(!r.needs_type_key());
    }

    #[test]
    fn unsubscribe_changes_generation_and_string_count() {
        let mut r = Router::new();
        let s = r.subscribe(
            Matcher::Exact("A".into()),
            1,
            "a".into(),
            Arc::default(),
            (),
        );
        assert!(r.needs_type_key());
        let g = r.generation();
        assert!(r.unsubscribe(s.id));
        assert!(!r.unsubscribe(s.id));
        assert!(r.generation() > g);
        assert!(!r.needs_type_key());
    }
}
