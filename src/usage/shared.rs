//! The ledger's counts in Redis, one hash per bucket
//! (`{prefix}:{usage}:d:{day}`, `…:h:{hour}`, `…:m:{minute}`; one hash tag,
//! so a clustered Redis keeps them on one node), a field per who and kind
//! (`org␟lane␟caller␟user␟e|r|t`). Every replica adds its own increments
//! with `HINCRBY`, so the totals are exact whatever the number of replicas.

use std::collections::HashMap;
use std::sync::Arc;

use crate::governor::SharedRedis;
use crate::governor::store::StoreError;

use super::tally::{Bucket, Counts, Tally, Who};

/// Field separator: the ASCII unit separator, found in no name.
const SEP: char = '\u{1f}';

/// How long a bucket's hash lives in Redis past its own end.
fn ttl_seconds(bucket: Bucket, retention_days: i64) -> i64 {
    match bucket {
        Bucket::Day(_) => (retention_days + 1) * 86_400,
        Bucket::Hour(_) => 26 * 3_600,
        Bucket::Minute(_) => 10 * 60,
    }
}

fn key(prefix: &str, bucket: Bucket) -> String {
    match bucket {
        Bucket::Day(d) => format!("{prefix}:{{usage}}:d:{d}"),
        Bucket::Hour(h) => format!("{prefix}:{{usage}}:h:{h}"),
        Bucket::Minute(m) => format!("{prefix}:{{usage}}:m:{m}"),
    }
}

fn field(who: &Who, kind: char) -> String {
    format!(
        "{}{SEP}{}{SEP}{}{SEP}{}{SEP}{kind}",
        who.org, who.lane, who.caller, who.user
    )
}

/// The ledger's epoch in Redis, written as `fresh` when there is none: a
/// Redis that lost its data (restarted empty, flushed, failed over) has
/// another one, and each replica then writes all its counts again.
pub async fn epoch(
    redis: &SharedRedis,
    fresh: &str,
    retention_days: i64,
) -> Result<String, StoreError> {
    let key = format!("{}:{{usage}}:epoch", redis.prefix());
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(&key)
        .arg(fresh)
        .arg("NX")
        .ignore()
        .expire(&key, (retention_days + 1) * 86_400)
        .ignore()
        .get(&key);
    let (epoch,): (String,) = redis.pipeline(&pipe).await?;
    Ok(epoch)
}

/// Writes `pending` to Redis in one pipeline.
pub async fn flush(
    redis: &SharedRedis,
    pending: &Tally,
    retention_days: i64,
) -> Result<(), StoreError> {
    let mut pipe = redis::pipe();
    for (bucket, row) in &pending.buckets {
        let key = key(redis.prefix(), *bucket);
        for (who, c) in row {
            for (kind, n) in [('e', c.executed), ('r', c.refused), ('t', c.dataverse_ms)] {
                if n > 0 {
                    pipe.hincr(&key, field(who, kind), n).ignore();
                }
            }
        }
        pipe.expire(&key, ttl_seconds(*bucket, retention_days))
            .ignore();
    }
    redis.pipeline::<()>(&pipe).await
}

/// Reads `buckets` from Redis.
pub async fn read(redis: &SharedRedis, buckets: &[Bucket]) -> Result<Tally, StoreError> {
    let mut pipe = redis::pipe();
    for bucket in buckets {
        pipe.hgetall(key(redis.prefix(), *bucket));
    }
    let rows: Vec<HashMap<String, u64>> = redis.pipeline(&pipe).await?;
    let mut tally = Tally::default();
    for (bucket, row) in buckets.iter().zip(rows) {
        for (field, n) in row {
            if let Some((who, kind)) = parse(&field) {
                let counts = match kind {
                    'e' => Counts {
                        executed: n,
                        ..Counts::default()
                    },
                    'r' => Counts {
                        refused: n,
                        ..Counts::default()
                    },
                    _ => Counts {
                        dataverse_ms: n,
                        ..Counts::default()
                    },
                };
                tally.add_to(*bucket, &who, counts);
            }
        }
    }
    Ok(tally)
}

/// A field back into who and kind; `None` for a field not written here.
fn parse(field: &str) -> Option<(Who, char)> {
    let mut parts = field.split(SEP);
    let mut next = || parts.next().map(Arc::<str>::from);
    let who = Who {
        org: next()?,
        lane: next()?,
        caller: next()?,
        user: next()?,
    };
    let kind = next()?
        .chars()
        .next()
        .filter(|k| matches!(k, 'e' | 'r' | 't'))?;
    Some((who, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_reads_back_as_written() {
        let who = Who {
            org: "contoso".into(),
            lane: "lane-b".into(),
            caller: "orders".into(),
            user: "-".into(),
        };
        assert_eq!(parse(&field(&who, 'e')), Some((who.clone(), 'e')));
        assert_eq!(parse("a\u{1f}b"), None);
        assert_eq!(parse(&field(&who, 'x')), None);
    }

    #[test]
    fn every_key_of_the_ledger_shares_one_hash_tag() {
        for bucket in [Bucket::Day(1), Bucket::Hour(2), Bucket::Minute(3)] {
            assert!(key("dvp", bucket).starts_with("dvp:{usage}:"));
        }
    }
}
