//! An attempt's time limit, on timers reused within a thread.
//!
//! `tokio::time::timeout` gives every attempt a timer of its own: at its
//! first wait the timer is inserted into the runtime's timer wheel, under
//! the wheel's lock, and when the attempt ends it is taken out again,
//! under the lock. For an attempt that ends long before its limit, which
//! is nearly every one, that is about 700 instructions of a proxied
//! request's 41,000, spent on a deadline that never comes.
//!
//! A tokio timer that is already in the wheel and is moved to a *later*
//! deadline does not touch the wheel: it stores the new deadline (one
//! compare-and-swap), and the wheel moves the entry when its old deadline
//! comes round. Attempt limits only move later as time goes on (now plus
//! the same limit), so an attempt here borrows a timer from a small stock
//! kept per thread and gives it back when it ends, still in the wheel.
//!
//! Even that move costs tokio's conversion of the deadline to a tick (a
//! 128-bit division) on every attempt. So a stocked timer set no later
//! than the attempt's deadline is not moved at all: it fires early, at its
//! old deadline, once per attempt limit (90 s by default), and is moved
//! to the deadline of the attempt holding it then, which therefore ends
//! exactly at its own deadline. The timer also keeps the waker it holds:
//! the next attempt of the same task (the next request on a keep-alive
//! connection) need not register it again.
//!
//! What a stocked timer keeps: its place in the wheel and the waker of the
//! last task that waited on it. When its deadline does come while it sits
//! in the stock (the thread went idle), it wakes that task once, for
//! nothing, and lets the waker go. The stock belongs to one runtime: a
//! thread that runs another runtime's tasks (a test's runtime after
//! another's) drops the stock first, as a timer only ever fires on the
//! runtime it was first armed in. Which runtime is current is asked only
//! when the task taking a timer is not the one that took the last (a
//! task runs on one runtime all its life, and task ids are unique in the
//! process): asking clones and drops the runtime's handle, two atomic
//! read-modify-writes, while the next request on a keep-alive connection
//! is the same task.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::runtime::{Handle, Id};
use tokio::time::Sleep;

use crate::clock::Moment;

/// Timers kept per thread: enough for the attempts one thread ends
/// between two of its attempt starts.
const KEPT: usize = 16;

/// A timer in the stock, the deadline it is set to, and the waker it holds
/// (`None` once it fired, or if it was never polled): the next attempt of
/// the same task need not register it again.
type Stocked = (Pin<Box<Sleep>>, Moment, Option<Waker>);

/// One thread's timers, the runtime they belong to, and the task that
/// took the last one (on that runtime).
#[derive(Default)]
struct Stock {
    runtime: Option<Id>,
    task: Option<tokio::task::Id>,
    timers: Vec<Stocked>,
}

thread_local! {
    /// Constant-initialised: an access checks no lazy-initialisation
    /// state (two accesses per attempt).
    static STOCK: RefCell<Stock> = const {
        RefCell::new(Stock {
            runtime: None,
            task: None,
            timers: Vec::new(),
        })
    };
}

/// The runtime this thread is running, if any (a clone and a drop of its
/// handle: asked only when the task changes, see the module docs).
fn current_runtime() -> Option<Id> {
    Handle::try_current().ok().map(|h| h.id())
}

/// The deadline came first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expired;

/// A timer borrowed for one attempt; back to its thread's stock when
/// dropped.
pub(crate) struct Timer {
    /// `None` only once given back.
    sleep: Option<Pin<Box<Sleep>>>,
    runtime: Option<Id>,
    /// The attempt's deadline. The timer itself may be set earlier: a
    /// stocked timer is not moved to a later deadline until it fires.
    deadline: Moment,
    /// The deadline the timer is set to, as a moment: compared with the
    /// next one without converting either to tokio's `Instant`.
    set: Moment,
    /// The waker the timer holds until it fires: as long as the same
    /// task polls, the timer is only looked at (polling it again would
    /// register the same waker again).
    waker: Option<Waker>,
}

impl Timer {
    /// A timer for `deadline`, from the stock when it holds one of this
    /// runtime's.
    #[inline]
    pub(crate) fn until(deadline: Moment) -> Timer {
        let task = tokio::task::try_id();
        let (runtime, stocked) = STOCK
            .try_with(|stock| {
                let mut stock = stock.borrow_mut();
                if task.is_none() || stock.task != task {
                    let runtime = current_runtime();
                    if stock.runtime != runtime {
                        stock.timers.clear();
                        stock.runtime = runtime;
                    }
                    stock.task = task;
                }
                (stock.runtime, stock.timers.pop())
            })
            .unwrap_or_else(|_| (current_runtime(), None));
        let mut timer = Timer {
            sleep: None,
            runtime,
            deadline,
            set: deadline,
            waker: None,
        };
        match stocked {
            Some((sleep, set, waker)) => {
                timer.sleep = Some(sleep);
                timer.set = set;
                timer.waker = waker;
                // Moved only when set later than `deadline`: one that fired
                // in the stock is set earlier, and its first poll finds it
                // elapsed and moves it then ([`Timer::poll_expired`]).
                if set > deadline {
                    timer.reset(deadline);
                }
            }
            None => {
                timer.sleep = Some(Box::pin(tokio::time::sleep_until(deadline.instant())));
            }
        }
        timer
    }

    /// Sets the attempt's deadline. The timer is left where it is when it
    /// is set no later than `deadline` and has not fired: it will fire
    /// early, once, and be moved then ([`Timer::poll_expired`]). Moving
    /// it later now would cost tokio's conversion of the deadline to a
    /// tick on every attempt, for a deadline that nearly never comes.
    pub(crate) fn reset(&mut self, deadline: Moment) {
        self.deadline = deadline;
        let Some(sleep) = &mut self.sleep else {
            return;
        };
        if sleep.is_elapsed() || self.set > deadline {
            sleep.as_mut().reset(deadline.instant());
            self.set = deadline;
            // A timer that fired has let its waker go, and one moved
            // earlier may fire at once: the next wait registers again.
            self.waker = None;
        }
    }

    /// Runs `fut` until this timer's deadline: `Err(Expired)` if the
    /// deadline comes first. `fut` is polled first, so one that is ready
    /// wins over a deadline that has passed too.
    #[cfg(test)]
    pub(crate) fn within<'a, F: Future>(
        &'a mut self,
        mut fut: Pin<&'a mut F>,
    ) -> impl Future<Output = Result<F::Output, Expired>> + 'a {
        std::future::poll_fn(move |cx| {
            if let Poll::Ready(output) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(output));
            }
            self.poll_expired(cx).map(|()| Err(Expired))
        })
    }

    /// Runs `fut` until `deadline` (`Err(Expired)` if the deadline comes
    /// first; `fut` is polled first, so one that is ready wins), taking a
    /// timer only if the first poll does not finish `fut`: an operation
    /// that completes at once (a cached answer, a local call) takes none.
    /// Pending, `fut` has the task's waker and is polled again only when
    /// the task wakes: polling it again at once would find it pending
    /// again, after walking all of it (for an HTTP client's request, a
    /// stack of a dozen futures, about 700 instructions). One future for
    /// the whole attempt: its output is moved out once, where a first poll
    /// of its own would hand it (for an HTTP response, ~180 bytes, a
    /// `memcpy` call) from one future to the next even when it is only
    /// `Pending`.
    pub(crate) fn limit_lazily<F: Future>(
        mut fut: Pin<&mut F>,
        deadline: Moment,
    ) -> impl Future<Output = Result<F::Output, Expired>> + '_ {
        let mut timer: Option<Timer> = None;
        std::future::poll_fn(move |cx| {
            if let Poll::Ready(output) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(output));
            }
            timer
                .get_or_insert_with(|| Timer::until(deadline))
                .poll_expired(cx)
                .map(|()| Err(Expired))
        })
    }

    /// Waits until the deadline.
    pub(crate) fn expired(&mut self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| self.poll_expired(cx))
    }

    #[inline]
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(sleep) = &mut self.sleep else {
            return Poll::Pending;
        };
        loop {
            if self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                if !sleep.is_elapsed() {
                    return Poll::Pending;
                }
            } else {
                // Outside the task's budget: a timer polled with the
                // budget used up (by the operation, or before it) would
                // neither register the waker nor look at the deadline,
                // and the polls after it, from the same task, only look
                // at `is_elapsed`. The operation's own resources take
                // part in the budget; the limit over them need not.
                let polled = Pin::new(&mut tokio::task::unconstrained(sleep.as_mut())).poll(cx);
                if polled.is_pending() {
                    self.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
            // It fired: at the attempt's deadline, or before it when it
            // was left at an earlier one. Then it is moved to the
            // attempt's deadline and waited on again.
            if self.set >= self.deadline {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(self.deadline.instant());
            self.set = self.deadline;
            self.waker = None;
        }
    }
}

impl Drop for Timer {
    #[inline]
    fn drop(&mut self) {
        let Some(sleep) = self.sleep.take() else {
            return;
        };
        // A full stock (or a thread being torn down) drops the timer,
        // which takes it out of the wheel.
        let waker = self.waker.take();
        let _ = STOCK.try_with(|stock| {
            let mut stock = stock.borrow_mut();
            if stock.runtime == self.runtime && stock.timers.len() < KEPT {
                stock.timers.push((sleep, self.set, waker));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use tokio::time::Instant;

    fn stocked() -> usize {
        STOCK.with(|s| s.borrow().timers.len())
    }

    /// Runs `Timer::until(deadline).within(fut)`, and says when it ended.
    async fn attempt<F: Future>(
        deadline: Instant,
        fut: F,
    ) -> (Result<F::Output, Expired>, Instant) {
        let fut = std::pin::pin!(fut);
        let out = Timer::until(Moment::of(deadline)).within(fut).await;
        (out, Instant::now())
    }

    /// Runs `attempt` with a deadline `limit` from now, under an outer
    /// bound: it must end `Expired`, exactly at the deadline (a timer
    /// that never wakes the task fails the outer bound instead of hanging).
    async fn expires_exactly<F>(limit: Duration, attempt: impl FnOnce(Instant) -> F)
    where
        F: Future<Output = (Result<(), Expired>, Instant)>,
    {
        let t0 = Instant::now();
        let out = tokio::time::timeout(limit * 20, attempt(t0 + limit)).await;
        let (out, at) = out.expect("the attempt's limit never woke its task");
        assert_eq!(out, Err(Expired));
        assert_eq!(at - t0, limit);
    }

    /// An attempt whose operation takes `op`, under a limit of `limit`:
    /// served; how long it took.
    async fn served(limit: Duration, op: Duration) -> Duration {
        let t = Instant::now();
        let (out, at) = attempt(t + limit, tokio::time::sleep(op)).await;
        assert_eq!(out, Ok(()));
        at - t
    }

    #[tokio::test(start_paused = true)]
    async fn expires_at_the_deadline_not_before() {
        let t0 = Instant::now();
        let (out, at) = attempt(
            t0 + Duration::from_millis(250),
            std::future::pending::<()>(),
        )
        .await;
        assert_eq!(out, Err(Expired));
        assert_eq!(at - t0, Duration::from_millis(250));
        // An operation that ends first wins.
        let took = served(Duration::from_millis(250), Duration::from_millis(40)).await;
        assert_eq!(took, Duration::from_millis(40));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_given_back_serves_the_next_attempt_at_its_own_deadline() {
        // Ends after 10 ms: its timer goes back to the stock, still armed
        // for 100 ms after the start.
        served(Duration::from_millis(100), Duration::from_millis(10)).await;
        assert_eq!(stocked(), 1);
        // The next attempt takes it (the stock is empty meanwhile) and
        // moves it later: the old deadline must not end it.
        let t1 = Instant::now();
        let fut = std::pin::pin!(std::future::pending::<()>());
        let mut timer = Timer::until(Moment::of(t1 + Duration::from_millis(300)));
        assert_eq!(stocked(), 0);
        assert_eq!(timer.within(fut).await, Err(Expired));
        assert_eq!(Instant::now() - t1, Duration::from_millis(300));
        drop(timer);
        assert_eq!(stocked(), 1);
        // Moved earlier, it ends at the earlier deadline.
        let t2 = Instant::now();
        let fut = std::pin::pin!(std::future::pending::<()>());
        let mut timer = Timer::until(Moment::of(t2 + Duration::from_millis(500)));
        timer.reset(Moment::of(t2 + Duration::from_millis(20)));
        assert_eq!(timer.within(fut).await, Err(Expired));
        assert_eq!(Instant::now() - t2, Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_another_task_waited_on_wakes_this_one() {
        // A task's attempt waits on the timer (its waker is registered)
        // and ends; the timer goes back to the stock with that waker.
        tokio::spawn(served(Duration::from_millis(20), Duration::from_millis(5)))
            .await
            .unwrap();
        assert_eq!(stocked(), 1);
        // This task's attempt takes it, left at the earlier deadline: the
        // timer must wake this task, not the one that has ended, then
        // and at this attempt's own deadline.
        expires_exactly(Duration::from_millis(50), |deadline| {
            attempt(deadline, std::future::pending::<()>())
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_left_at_an_earlier_deadline_ends_the_attempt_at_its_own() {
        // The same task, attempt after attempt, each deadline later than
        // the one before: the stocked timer stays at the first one's
        // deadline (t0 + 100 ms) until that passes, during the third
        // attempt, which it wakes early, and is moved then.
        let t0 = Instant::now();
        for _ in 0..4 {
            let took = served(Duration::from_millis(100), Duration::from_millis(40)).await;
            assert_eq!(took, Duration::from_millis(40));
            assert_eq!(stocked(), 1);
        }
        assert_eq!(Instant::now() - t0, Duration::from_millis(160));
        let t1 = Instant::now();
        let (out, at) = attempt(
            t1 + Duration::from_millis(100),
            std::future::pending::<()>(),
        )
        .await;
        assert_eq!(out, Err(Expired));
        assert_eq!(at - t1, Duration::from_millis(100));
        // And an attempt that is served just before its deadline is served.
        let took = served(Duration::from_millis(100), Duration::from_millis(99)).await;
        assert_eq!(took, Duration::from_millis(99));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_on_a_stocked_timer_ends_at_its_own_deadline() {
        // A retry's wait borrows a stocked timer as an attempt does. Left
        // at an earlier deadline (t0 + 30 ms), it must not end a wait until
        // t0 + 80 ms early; set to a later one (t0 + 500 ms), then to
        // t0 + 100 ms, it must not end the wait late.
        let t0 = Instant::now();
        served(Duration::from_millis(30), Duration::from_millis(10)).await;
        assert_eq!(stocked(), 1);
        Timer::until(Moment::of(t0 + Duration::from_millis(80)))
            .expired()
            .await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(80));
        assert_eq!(stocked(), 1);
        let mut late = Timer::until(Moment::of(t0 + Duration::from_millis(500)));
        late.reset(Moment::of(t0 + Duration::from_millis(100)));
        late.expired().await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn the_stock_is_bounded() {
        let t0 = Instant::now();
        let timers: Vec<Timer> = (0..KEPT + 5)
            .map(|_| Timer::until(Moment::of(t0 + Duration::from_secs(1))))
            .collect();
        drop(timers);
        assert_eq!(stocked(), KEPT);
    }

    #[test]
    fn a_timer_never_serves_another_runtime() {
        let paused = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
        };
        // Attempts in the runtime's main future (no task), then in tasks:
        // a task of the second runtime must not take the first one's
        // timer for its own because some task took it last.
        for in_task in [false, true] {
            let run = |rt: &tokio::runtime::Runtime,
                       work: Pin<Box<dyn Future<Output = ()> + Send>>| {
                if in_task {
                    rt.block_on(async { tokio::spawn(work).await.unwrap() })
                } else {
                    rt.block_on(work)
                }
            };
            let first = paused();
            run(
                &first,
                Box::pin(async {
                    let (out, _) = attempt(Instant::now() + Duration::from_secs(1), async {}).await;
                    assert_eq!(out, Ok(()));
                }),
            );
            assert_eq!(stocked(), 1);
            drop(first);
            // A timer of the first runtime would panic here (its driver is
            // shut down), or never fire.
            run(
                &paused(),
                Box::pin(async {
                    let t0 = Instant::now();
                    let (out, at) =
                        attempt(t0 + Duration::from_millis(70), std::future::pending::<()>()).await;
                    assert_eq!(out, Err(Expired));
                    assert_eq!(at - t0, Duration::from_millis(70));
                }),
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_operation_that_uses_up_the_budget_still_times_out() {
        let t0 = Instant::now();
        tokio::spawn(tokio::time::advance(Duration::from_millis(50)));
        // Always busy: uses up the task's budget at every poll (and is
        // polled again at once); done by itself after many polls.
        let mut polls = 0u32;
        let busy = std::future::poll_fn(|cx| {
            polls += 1;
            if polls == 100_000 {
                return Poll::Ready(polls);
            }
            while tokio::task::coop::has_budget_remaining() {
                let _ = std::pin::pin!(tokio::task::consume_budget()).poll(cx);
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        let (out, _) = attempt(t0 + Duration::from_millis(10), busy).await;
        assert_eq!(out, Err(Expired));
    }

    /// Runs `fut` under `Timer::limit_lazily(deadline)`, and says when it
    /// ended.
    async fn lazily<F: Future>(deadline: Instant, fut: F) -> (Result<F::Output, Expired>, Instant) {
        let fut = std::pin::pin!(fut);
        let out = Timer::limit_lazily(fut, Moment::of(deadline)).await;
        (out, Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn a_lazy_limit_takes_a_timer_only_for_an_operation_that_waits() {
        // One timer in the stock, given back by an attempt that waited.
        served(Duration::from_millis(100), Duration::from_millis(10)).await;
        assert_eq!(stocked(), 1);
        // Ready at its first poll: no timer taken, none given back.
        let t0 = Instant::now();
        let fut = std::pin::pin!(std::future::ready(7));
        let mut limited = std::pin::pin!(Timer::limit_lazily(
            fut,
            Moment::of(t0 + Duration::from_millis(50))
        ));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(limited.as_mut().poll(&mut cx), Poll::Ready(Ok(7)));
        assert_eq!(stocked(), 1);
        // Pending at its first poll: the stocked timer is taken then, and
        // the operation ends first.
        {
            let fut = std::pin::pin!(tokio::time::sleep(Duration::from_millis(30)));
            let mut limited = std::pin::pin!(Timer::limit_lazily(
                fut,
                Moment::of(t0 + Duration::from_millis(50))
            ));
            assert!(limited.as_mut().poll(&mut cx).is_pending());
            assert_eq!(stocked(), 0);
            assert_eq!(limited.await, Ok(()));
            assert_eq!(Instant::now() - t0, Duration::from_millis(30));
        }
        // Given back when the attempt's future is dropped.
        assert_eq!(stocked(), 1);
        // One that never ends is cut at its own deadline, though the
        // stocked timer was set for an earlier one (the first attempt's,
        // at 100 ms) and fired while in the stock.
        tokio::time::advance(Duration::from_millis(100)).await;
        let t1 = Instant::now();
        expires_exactly(Duration::from_millis(40), |deadline| async move {
            let fut = std::pin::pin!(std::future::pending::<()>());
            let out = Timer::limit_lazily(fut, Moment::of(deadline)).await;
            (out, Instant::now())
        })
        .await;
        assert_eq!(Instant::now() - t1, Duration::from_millis(40));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lazy_limit_polls_the_operation_only_when_it_wakes() {
        let t0 = Instant::now();
        let mut polls = 0;
        let mut sleep = std::pin::pin!(tokio::time::sleep(Duration::from_millis(30)));
        let op = std::future::poll_fn(|cx| {
            polls += 1;
            sleep.as_mut().poll(cx)
        });
        let (out, at) = lazily(t0 + Duration::from_millis(100), op).await;
        assert_eq!(out, Ok(()));
        assert_eq!(at - t0, Duration::from_millis(30));
        // The first poll, and the one its wake-up asked for.
        assert_eq!(polls, 2);
        // And the deadline still ends an operation that never wakes.
        let t1 = Instant::now();
        let (out, at) = lazily(t1 + Duration::from_millis(40), std::future::pending::<()>()).await;
        assert_eq!(out, Err(Expired));
        assert_eq!(at - t1, Duration::from_millis(40));
    }

    #[tokio::test(start_paused = true)]
    async fn an_operation_that_used_up_the_budget_before_the_timer_still_times_out() {
        // Uses up the task's budget at every poll and never wakes the task:
        // the timer is first polled with no budget left.
        let hog = std::future::poll_fn(|cx| {
            while tokio::task::coop::has_budget_remaining() {
                let _ = std::pin::pin!(tokio::task::consume_budget()).poll(cx);
            }
            Poll::<()>::Pending
        });
        expires_exactly(Duration::from_millis(25), |deadline| lazily(deadline, hog)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_waker_is_registered() {
        let t0 = Instant::now();
        let mut timer = Timer::until(Moment::of(t0 + Duration::from_millis(30)));
        let mut fut = std::pin::pin!(std::future::pending::<()>());
        let mut within = std::pin::pin!(timer.within(fut.as_mut()));
        // Polled once by someone else (who will never poll again).
        let mut elsewhere = Context::from_waker(Waker::noop());
        assert!(within.as_mut().poll(&mut elsewhere).is_pending());
        // This task must be woken at the deadline, not by the later one.
        let out = tokio::time::timeout(Duration::from_millis(200), within).await;
        assert_eq!(out, Ok(Err(Expired)));
        assert_eq!(Instant::now() - t0, Duration::from_millis(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_moved_after_it_fired_wakes_the_task_again() {
        // The connect phase's limit, then the attempt's, on one timer.
        let t0 = Instant::now();
        let mut timer = Timer::until(Moment::of(t0 + Duration::from_millis(10)));
        let mut fut = std::pin::pin!(std::future::pending::<()>());
        assert_eq!(timer.within(fut.as_mut()).await, Err(Expired));
        assert_eq!(Instant::now() - t0, Duration::from_millis(10));
        timer.reset(Moment::of(t0 + Duration::from_millis(60)));
        // A later timer of its own would end this wait too, later: the
        // moved timer must end it first.
        let out = tokio::time::timeout(Duration::from_millis(500), timer.within(fut)).await;
        assert_eq!(out, Ok(Err(Expired)));
        assert_eq!(Instant::now() - t0, Duration::from_millis(60));
    }
}
