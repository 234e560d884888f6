//! Upstream acknowledgements, sent only once an event is safe and always in receive order.
//!
//! An [`AckQueue`] holds the messages an input received and has not yet acknowledged, in
//! receive order. Each gets an [`Ack`] token; the events decoded from the message carry
//! clones of it through stages, the router, the spool and the Kafka producer. When the last
//! clone is dropped the message counts as done, and every done message at the front of the
//! queue is released to the input's acknowledge function. So an acknowledgement never
//! overtakes an earlier message (MQTT requires in-order acks).
//!
//! Invariant: a token is dropped only when its event is safe under the ack policy
//! (committed to the spool, or confirmed by Kafka), or accounted as dropped (filtered,
//! malformed). On a reconnect the queue is reset: tokens from the old connection complete
//! into nothing, because their packet ids mean nothing on the new one (the broker
//! redelivers those messages, and the duplicates carry the same event ids).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

type Release<T> = Box<dyn Fn(T) + Send + Sync>;

struct State<T> {
    /// Index of the front slot.
    base: u64,
    /// `None` once done, waiting for the messages before it.
    slots: VecDeque<(bool, Option<T>)>,
}

/// The in-order acknowledgement queue of one input connection.
pub struct AckQueue<T> {
    state: Mutex<State<T>>,
    release: Release<T>,
}

impl<T: Send + 'static> AckQueue<T> {
    /// A queue that hands each released message to `release`, in order. `release` runs
    /// under the queue's lock, so it must be quick and must not use the queue.
    pub fn new(release: impl Fn(T) + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(AckQueue {
            state: Mutex::new(State {
                base: 0,
                slots: VecDeque::new(),
            }),
            release: Box::new(release),
        })
    }

    /// Registers a received message; it is released once the token and all its clones
    /// are dropped and every earlier message was released.
    pub fn push(self: &Arc<Self>, message: T) -> Ack {
        let mut st = self.lock();
        let idx = st.base + st.slots.len() as u64;
        st.slots.push_back((false, Some(message)));
        drop(st);
        let queue: Arc<dyn Complete> = self.clone();
        Ack(Some(Arc::new(AckInner {
            queue,
            idx,
            armed: AtomicBool::new(true),
        })))
    }

    /// Forgets every pending message (after a reconnect).
    pub fn reset(&self) {
        let mut st = self.lock();
        st.base += st.slots.len() as u64;
        st.slots.clear();
    }

    /// Messages received and not yet released.
    pub fn pending(&self) -> usize {
        self.lock().slots.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

trait Complete: Send + Sync {
    fn complete(&self, idx: u64);
}

impl<T: Send> Complete for AckQueue<T> {
    fn complete(&self, idx: u64) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if idx < st.base {
            return; // from before a reset
        }
        let pos = (idx - st.base) as usize;
        if let Some(slot) = st.slots.get_mut(pos) {
            slot.0 = true;
        }
        // Released under the lock: released after it, a message popped here could be
        // overtaken by a later one that another thread completed and popped meanwhile.
        while st.slots.front().is_some_and(|s| s.0) {
            if let Some((_, Some(m))) = st.slots.pop_front() {
                (self.release)(m);
            }
            st.base += 1;
        }
    }
}

struct AckInner {
    queue: Arc<dyn Complete>,
    idx: u64,
    armed: AtomicBool,
}

impl Drop for AckInner {
    fn drop(&mut self) {
        if self.armed.load(Ordering::Acquire) {
            self.queue.complete(self.idx);
        }
    }
}

/// A share in one upstream message's acknowledgement. Clone it for every event decoded
/// from the message; the message is acknowledged when the last share is dropped.
#[derive(Clone, Default)]
pub struct Ack(Option<Arc<AckInner>>);

impl Ack {
    /// A token for a message that needs no acknowledgement (QoS 0, or already acked).
    pub fn none() -> Ack {
        Ack(None)
    }

    /// Makes sure the message is never acknowledged (for every share of it): used on
    /// shutdown for records that are not safe yet, so the broker redelivers them. Later
    /// messages of the same connection then wait forever, so only use it when the
    /// connection is going away.
    pub fn disarm(&self) {
        if let Some(i) = &self.0 {
            i.armed.store(false, Ordering::Release);
        }
    }
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(i) => write!(f, "Ack({})", i.idx),
            None => write!(f, "Ack(none)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> (Arc<AckQueue<u32>>, Arc<Mutex<Vec<u32>>>) {
        let out = Arc::new(Mutex::new(Vec::new()));
        let o = out.clone();
        let q = AckQueue::new(move |m| o.lock().expect("lock").push(m));
        (q, out)
    }

    fn released(out: &Arc<Mutex<Vec<u32>>>) -> Vec<u32> {
        out.lock().expect("lock").clone()
    }

    #[test]
    fn acks_go_out_in_receive_order() {
        let (q, out) = queue();
        let a = q.push(1);
        let b = q.push(2);
        let c = q.push(3);
        drop(c);
        drop(b);
        assert_eq!(released(&out), Vec::<u32>::new(), "3 and 2 wait for 1");
        drop(a);
        assert_eq!(released(&out), [1, 2, 3]);
        assert_eq!(q.pending(), 0);
    }

    #[test]
    fn a_message_waits_for_all_its_events() {
        let (q, out) = queue();
        let a = q.push(1);
        let a2 = a.clone();
        drop(a);
        assert!(released(&out).is_empty());
        drop(a2);
        assert_eq!(released(&out), [1]);
    }

    #[test]
    fn a_disarmed_message_is_never_released() {
        let (q, out) = queue();
        let a = q.push(1);
        a.clone().disarm();
        drop(a);
        let b = q.push(2);
        drop(b);
        assert!(released(&out).is_empty());
    }

    #[test]
    fn reset_forgets_old_tokens() {
        let (q, out) = queue();
        let old = q.push(1);
        q.reset();
        let new = q.push(2);
        drop(old);
        assert!(released(&out).is_empty());
        drop(new);
        assert_eq!(released(&out), [2]);
    }

    #[test]
    fn threads_completing_at_once_still_release_in_order() {
        // The router completes some messages while an input drops its share of others:
        // a message popped by one thread must not be overtaken by a later one popped by
        // another before the first was handed to `release`.
        const N: u32 = 20_000;
        const THREADS: u32 = 4;
        let out = Arc::new(Mutex::new(Vec::new()));
        let q = {
            let out = out.clone();
            // A release that takes a moment (a channel send can), so that a later
            // message completed on another thread has the time to overtake it.
            AckQueue::new(move |m| {
                std::thread::yield_now();
                out.lock().expect("lock").push(m);
            })
        };
        let mut tokens: Vec<Vec<Ack>> = (0..THREADS).map(|_| Vec::new()).collect();
        for i in 0..N {
            tokens[(i % THREADS) as usize].push(q.push(i));
        }
        let start = Arc::new(std::sync::Barrier::new(THREADS as usize));
        let threads: Vec<_> = tokens
            .into_iter()
            .map(|mine| {
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    for t in mine {
                        drop(t);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(released(&out), (0..N).collect::<Vec<_>>());
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_completion_order_releases_in_order(order in Just((0..40u32).collect::<Vec<_>>()).prop_shuffle()) {
            let (q, out) = queue();
            let mut tokens: Vec<Option<Ack>> = (0..40).map(|i| Some(q.push(i))).collect();
            for i in order {
                tokens[i as usize] = None;
                let r = released(&out);
                // Released is always a prefix 0..k of receive order.
                prop_assert!(r.iter().enumerate().all(|(k, v)| *v == k as u32));
            }
            prop_assert_eq!(released(&out), (0..40).collect::<Vec<_>>());
        }
    }
}
