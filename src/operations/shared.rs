//! Answers shared by concurrent callers for a short while: an expensive read (the attention
//! list's counts go over every entity in flight) is computed at most once per `ttl` and one at
//! a time, whatever the number of dashboards open, so readers cannot pile work on the database
//! that intake needs. A caller that arrives while it is being computed waits for that result;
//! with [`SharedAnswers::recent`], a caller gets a slightly stale answer at once while one
//! refreshes it in the background, so nobody waits once there is an answer.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

pub struct SharedAnswers<K, V> {
    ttl: Duration,
    answers: std::sync::Mutex<HashMap<K, (Instant, V)>>,
    /// One computation at a time (across keys).
    computing: tokio::sync::Mutex<()>,
    /// Keys being refreshed in the background ([`SharedAnswers::recent`]).
    refreshing: std::sync::Mutex<std::collections::HashSet<K>>,
}

/// How much older than `ttl` an answer may be and still be given at once while a fresh one is
/// computed in the background; older ones are waited for.
const STALE_FOR_AT_MOST: u32 = 10;

impl<K: Eq + Hash + Clone, V: Clone> SharedAnswers<K, V> {
    pub fn new(ttl: Duration) -> Self {
        SharedAnswers {
            ttl,
            answers: std::sync::Mutex::new(HashMap::new()),
            computing: tokio::sync::Mutex::new(()),
            refreshing: std::sync::Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// The last answer for `key` if it is younger than `STALE_FOR_AT_MOST` times `ttl`, and
    /// whether the caller should refresh it (it is older than `ttl` and nobody refreshes it yet;
    /// the caller then calls [`SharedAnswers::refreshed`] when done, whatever happened).
    pub fn recent(&self, key: &K) -> Option<(V, bool)> {
        let (age, value) = {
            let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
            let (at, value) = answers.get(key)?;
            (at.elapsed(), value.clone())
        };
        if age >= self.ttl * STALE_FOR_AT_MOST {
            return None;
        }
        let refresh = age >= self.ttl
            && self
                .refreshing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone());
        Some((value, refresh))
    }

    /// The background refresh of `key` is over.
    pub fn refreshed(&self, key: &K) {
        self.refreshing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    fn fresh(&self, key: &K) -> Option<V> {
        let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        answers
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, value)| value.clone())
    }

    /// The answer for `key` computed within `ttl`, or a new one from `compute`.
    pub async fn get_or_compute<E, Fut>(
        &self,
        key: K,
        compute: impl FnOnce() -> Fut,
    ) -> Result<V, E>
    where
        Fut: std::future::Future<Output = Result<V, E>>,
    {
        if let Some(value) = self.fresh(&key) {
            return Ok(value);
        }
        let _turn = self.computing.lock().await;
        // Computed by the caller we waited for?
        if let Some(value) = self.fresh(&key) {
            return Ok(value);
        }
        let value = compute().await?;
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        answers.retain(|_, (at, _)| at.elapsed() < self.ttl);
        answers.insert(key, (Instant::now(), value.clone()));
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_computation_until_it_is_stale() {
        let shared = Arc::new(SharedAnswers::<u8, usize>::new(Duration::from_millis(300)));
        let computed = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..16)
            .map(|_| {
                let (shared, computed) = (shared.clone(), computed.clone());
                tokio::spawn(async move {
                    shared
                        .get_or_compute(1, || async {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok::<_, ()>(computed.fetch_add(1, Ordering::SeqCst) + 1)
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.unwrap(), 1, "everyone got the one answer");
        }
        assert_eq!(computed.load(Ordering::SeqCst), 1);
        // Another key is its own answer; a stale one is computed again.
        let other = shared
            .get_or_compute(2, || async { Ok::<_, ()>(99) })
            .await
            .unwrap();
        assert_eq!(other, 99);
        tokio::time::sleep(Duration::from_millis(350)).await;
        let again = shared
            .get_or_compute(1, || async {
                Ok::<_, ()>(computed.fetch_add(1, Ordering::SeqCst) + 1)
            })
            .await
            .unwrap();
        assert_eq!(again, 2);
        // An error is not kept.
        let failed = shared
            .get_or_compute(3, || async { Err::<usize, _>("down") })
            .await;
        assert!(failed.is_err());
        let recovered = shared
            .get_or_compute(3, || async { Ok::<_, &str>(7) })
            .await;
        assert_eq!(recovered, Ok(7));
    }

    #[tokio::test]
    async fn a_stale_answer_is_given_at_once_and_one_caller_refreshes_it() {
        let shared = SharedAnswers::<u8, u32>::new(Duration::from_millis(100));
        assert!(shared.recent(&1).is_none(), "nothing yet: wait for it");
        shared
            .get_or_compute(1, || async { Ok::<_, ()>(1) })
            .await
            .unwrap();
        assert_eq!(shared.recent(&1), Some((1, false)), "fresh");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(
            shared.recent(&1),
            Some((1, true)),
            "stale: this caller refreshes"
        );
        assert_eq!(
            shared.recent(&1),
            Some((1, false)),
            "someone refreshes already"
        );
        shared
            .get_or_compute(1, || async { Ok::<_, ()>(2) })
            .await
            .unwrap();
        shared.refreshed(&1);
        assert_eq!(shared.recent(&1), Some((2, false)));
        tokio::time::sleep(Duration::from_millis(1_050)).await;
        assert!(
            shared.recent(&1).is_none(),
            "too old to give: wait for a new one"
        );
    }
}
