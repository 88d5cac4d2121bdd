//! A future polled only after its own waker fired.
//!
//! A session is one task that selects over its two pumps and the events
//! that may end it (shutdown, the idle timeout). `tokio::select!` polls
//! every branch each time the task wakes, and the task wakes for every
//! message: the direction that did not wake, the shutdown watch (a lock on
//! its waiter list) and the timer were polled for nothing, once per
//! message. Wrapped in `Woken`, a branch gets a waker of its own that marks
//! it before waking the task, and is polled only when marked.
//!
//! Only for futures whose progress is always signalled through the waker
//! they were polled with (sockets, channels, `Notify`, timers); one that
//! waits on state another branch changes without waking it must not be
//! wrapped.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// The branch's own waker: marks it, then wakes the session's task.
struct Mark {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Mark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// `fut`, polled on its first poll and then only after it was woken.
pub struct Woken<F> {
    fut: F,
    mark: Arc<Mark>,
    waker: Waker,
}

impl<F: Future + Unpin> Woken<F> {
    pub fn new(fut: F) -> Self {
        let mark = Arc::new(Mark {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(Arc::clone(&mark));
        Self { fut, mark, waker }
    }
}

impl<F: Future + Unpin> Woken<F> {
    /// Polls `fut` if it was woken, or whatever the mark says when
    /// `always` is true: for a future that waits only on wakeable things at
    /// some times (then `always` is false) and on state other branches
    /// change without waking it at others.
    pub fn poll_woken_or(&mut self, cx: &mut Context<'_>, always: bool) -> Poll<F::Output> {
        // The task's waker first: a wake from here on reaches it.
        self.mark.task.register(cx.waker());
        if !self.mark.woken.swap(false, Ordering::AcqRel) && !always {
            return Poll::Pending;
        }
        Pin::new(&mut self.fut).poll(&mut Context::from_waker(&self.waker))
    }
}

impl<F: Future + Unpin> Future for Woken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.poll_woken_or(cx, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; ready once `ready` is set, waking through the
    /// waker it was last polled with.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.ready.load(Ordering::Relaxed) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn polled_first_and_then_only_after_its_own_wake() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let inner_waker = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let mut w = Woken::new(Probe {
            polls: Arc::clone(&polls),
            ready: Arc::clone(&ready),
            waker: Arc::clone(&inner_waker),
        });
        let task_wakes = Arc::new(AtomicUsize::new(0));
        struct Count(Arc<AtomicUsize>);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let task = Waker::from(Arc::new(Count(Arc::clone(&task_wakes))));
        let mut cx = Context::from_waker(&task);

        assert!(Pin::new(&mut w).poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 1, "the first poll goes in");
        // The task woke for something else: the inner future is left alone.
        for _ in 0..3 {
            assert!(Pin::new(&mut w).poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        // Its own wake marks it and wakes the task.
        ready.store(true, Ordering::Relaxed);
        inner_waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(task_wakes.load(Ordering::Relaxed), 1);
        assert!(Pin::new(&mut w).poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn always_polls_without_a_wake_and_then_goes_back_to_waiting_for_one() {
        let polls = Arc::new(AtomicUsize::new(0));
        let mut w = Woken::new(Probe {
            polls: Arc::clone(&polls),
            ready: Arc::new(AtomicBool::new(false)),
            waker: Arc::new(std::sync::Mutex::new(None)),
        });
        let task = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&task);
        assert!(w.poll_woken_or(&mut cx, false).is_pending());
        assert!(w.poll_woken_or(&mut cx, false).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        // Busy (say, a responder serving a request): polled at every wake.
        for _ in 0..3 {
            assert!(w.poll_woken_or(&mut cx, true).is_pending());
        }
        assert_eq!(polls.load(Ordering::Relaxed), 4);
        // Parked again: left alone until its own wake.
        assert!(w.poll_woken_or(&mut cx, false).is_pending());
        assert_eq!(polls.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn a_wrapped_socket_read_completes_in_a_select() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut a, mut b) = tokio::io::duplex(64);
        let mut buf = [0u8; 5];
        let writer = tokio::spawn(async move {
            tokio::task::yield_now().await;
            a.write_all(b"hello").await.unwrap();
            a
        });
        {
            let read = b.read_exact(&mut buf);
            tokio::pin!(read);
            let mut read = Woken::new(read);
            let mut never = Woken::new(std::future::pending::<()>());
            tokio::select! {
                biased;
                _ = &mut never => unreachable!(),
                r = &mut read => assert_eq!(r.unwrap(), 5),
            }
        }
        drop(writer.await.unwrap());
        assert_eq!(&buf, b"hello");
    }
}
