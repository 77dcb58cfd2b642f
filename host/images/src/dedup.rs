//! Concurrent calls with the same key share one run (the pull de-duplication
//! behind [`crate::ImageStore::pull`]).
//!
//! The run is spawned as its own task on the first poll, so it completes
//! even if every caller goes away. Its map entry is removed by a guard that
//! the task owns: whether the run returns, fails or **panics**, the key is
//! free again afterwards, so one bad pull never pins a failed (or panicked)
//! result that every later pull of the same image would join.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, Shared};
use futures_util::FutureExt;

use crate::error::{ImageError, Result};

pub(crate) type SharedRun<V> = Shared<BoxFuture<'static, Result<V>>>;

type Map<K, V> = Arc<Mutex<HashMap<K, SharedRun<V>>>>;

pub(crate) struct Dedup<K, V> {
    map: Map<K, V>,
}

impl<K, V> Dedup<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new() -> Self {
        Dedup {
            map: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The run for `key`: the one in progress (`joined = true`), or a new
    /// one made by `start`. Await the returned future right away (the run
    /// is spawned on its first poll); needs a tokio runtime.
    pub fn run<F>(&self, key: K, start: impl FnOnce() -> F) -> (SharedRun<V>, bool)
    where
        F: Future<Output = Result<V>> + Send + 'static,
    {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = map.get(&key) {
            return (f.clone(), true);
        }
        let guard = Forget {
            map: self.map.clone(),
            key: Some(key.clone()),
        };
        let work = start();
        // Spawned on first poll, never while `map` is locked here: a task
        // dropped at once (runtime shutting down) drops the guard, which
        // takes the lock.
        let f = async move {
            let task = tokio::spawn(async move {
                let _guard = guard;
                work.await
            });
            match task.await {
                Ok(r) => r,
                Err(e) if e.is_panic() => Err(ImageError::store(
                    "pull task",
                    "panicked (a bug; see the daemon log)",
                )),
                Err(e) => Err(ImageError::store("pull task", e)),
            }
        }
        .boxed()
        .shared();
        map.insert(key, f.clone());
        (f, false)
    }

    /// Runs in progress.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Removes the run's key when the run's task ends in any way.
struct Forget<K: Eq + Hash, V> {
    map: Map<K, V>,
    key: Option<K>,
}

impl<K: Eq + Hash, V> Drop for Forget<K, V> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.map
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn a_panicking_run_frees_its_key_and_the_next_call_runs_again() {
        let d: Dedup<String, u32> = Dedup::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let (f, joined) = d.run("img".into(), || {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                if runs.load(Ordering::SeqCst) == 1 {
                    panic!("injected: a bug in the pull");
                }
                Ok(7)
            }
        });
        assert!(!joined);
        let err = f.await.unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
        assert_eq!(d.in_flight(), 0, "the panicked run left its entry");
        let (f, joined) = d.run("img".into(), || {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(7)
            }
        });
        assert!(!joined, "joined the dead run");
        assert_eq!(f.await.unwrap(), 7);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(d.in_flight(), 0);
    }

    #[tokio::test]
    async fn concurrent_calls_share_one_run_and_errors_are_not_kept() {
        let d: Dedup<&'static str, u32> = Dedup::new();
        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
        let (a, ja) = d.run("k", || async move {
            let _ = gate_rx.await;
            Err(ImageError::registry("k", "503"))
        });
        let (b, jb) = d.run("k", || async { Ok(1) });
        assert!(!ja && jb);
        assert_eq!(d.in_flight(), 1);
        let _ = gate_tx.send(());
        assert!(a.await.is_err());
        assert!(b.await.is_err(), "the joiner shares the result");
        assert_eq!(d.in_flight(), 0);
        let (c, jc) = d.run("k", || async { Ok(2) });
        assert!(!jc);
        assert_eq!(c.await.unwrap(), 2);
    }

    #[tokio::test]
    async fn the_run_finishes_and_frees_its_key_when_every_caller_is_gone() {
        let d: Dedup<&'static str, u32> = Dedup::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (f, _) = d.run("k", || async move {
            let _ = rx.await;
            Ok(1)
        });
        // The caller polls once (spawning the run), then goes away.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(10), f).await;
        assert_eq!(d.in_flight(), 1);
        let _ = tx.send(());
        for _ in 0..100 {
            if d.in_flight() == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("entry kept after the run ended");
    }
}
