//! The index lock: one writer at a time among every process attached to a context.
//!
//! # Why not `flock`
//! A small save holds the lock for a microsecond or two, twice. With `flock` on a lock
//! file, each take and each release was a system call on one shared inode; when two
//! processes saved at once they queued on its spinlock and slept in the kernel, and two
//! processes on two cores did a third of one process's small operations. This lock is
//! four words in the meta page that every attached process maps: taken with a
//! compare-exchange, released with a store, and slept on (a futex) only by a waiter that
//! has watched it stay held for a while.
//!
//! # Words (in a cache line of their own)
//! - `owner`: `0` when free, else the token of the attached handle that holds it.
//! - `seq`: a futex word, advanced by a release that finds sleepers, which it wakes one
//!   at a time.
//! - `sleepers`: how many threads sleep on `seq`.
//! - `idle_wakes`: how many releases in a row found `sleepers` above zero but woke nobody.
//! - `spinner`: until when (nanoseconds of `CLOCK_MONOTONIC`) a waiter watches `owner`.
//!   One waiter spins at a time; the others give their CPU away once (the holder may be
//!   waiting for it) and then sleep: with more waiting processes than cores, spinners
//!   would take the holder's core.
//!
//! # Holders that die
//! The kernel released an `flock` when its holder died; it does not clear `owner`. A
//! waiter that watched one holder keep the lock for a whole nap, with no release waking it
//! (a signal cutting a nap short does not start the watch again), asks whether that holder
//! is still alive: every attached handle holds a lock on its liveness file
//! (`procs/<token>`) for as long as it lives, and the kernel drops that one when the
//! process dies, unless a process it forked without `exec` still holds a copy of the
//! file's descriptor: so the file also names the process that took the lock, and a lock
//! whose taker is gone counts as dead. If the holder is dead, the waiter takes the lock
//! over with a compare-exchange from the dead token, so exactly one waiter does, about 10 ms
//! after the death. The new holder then does what every writer does first: it catches up with the
//! journal and repairs whatever the dead writer left half done.
//!
//! A process killed while it sleeps leaves `sleepers` counted up, and each release would
//! make a futex wake call that wakes nobody: a system call per release, for the rest of the
//! context's life. So a release that wakes nobody counts it in `idle_wakes` (a wake that
//! wakes someone clears it), and after [`STALE_AFTER`] in a row takes one off `sleepers`:
//! a live sleeper is on the futex, or a few instructions from it, so wakes miss it only
//! for as long as it is between its count and its wait. Were a sleeper preempted there
//! for all those releases, the count would end one too low; the release that should wake
//! it then does not, and it takes the lock after its nap (10 ms), which a sleeper does
//! anyway when a wake misses it. Sleepers take themselves off with a subtraction that
//! stops at zero, so the count never wraps. One killed while it spins holds `spinner`
//! until its deadline passes.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::thread::futex;

/// How long a waiter watches the owner word before it sleeps: a few small saves' worth.
const SPIN: Duration = Duration::from_micros(20);
/// How long a sleeper sleeps before it looks at the holder again (whether it died).
const NAP: Duration = Duration::from_millis(10);
/// How many releases in a row must wake nobody before `sleepers` is taken as one too high.
pub(crate) const STALE_AFTER: u32 = 256;

/// The lock's words, in memory every attached process maps.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IndexLock<'a> {
    owner: &'a AtomicU64,
    seq: &'a AtomicU32,
    sleepers: &'a AtomicU32,
    idle_wakes: &'a AtomicU32,
    spinner: &'a AtomicU64,
}

/// How a nap ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Nap {
    /// It lasted [`NAP`]: no release woke this thread.
    Whole,
    /// A signal handler cut it short.
    Interrupted,
    /// A release woke it, or came before it began.
    Woken,
}

/// How a lock was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Taken {
    /// It was free.
    Free,
    /// From a holder that had died: its token.
    FromDead(u64),
}

impl<'a> IndexLock<'a> {
    pub(crate) fn new(
        owner: &'a AtomicU64,
        seq: &'a AtomicU32,
        sleepers: &'a AtomicU32,
        idle_wakes: &'a AtomicU32,
        spinner: &'a AtomicU64,
    ) -> Self {
        IndexLock { owner, seq, sleepers, idle_wakes, spinner }
    }

    /// Takes the lock for `token` (never 0), waiting as long as a live handle holds it.
    /// `alive(t)` says whether the handle with token `t` is alive; it is asked only after
    /// the lock has stayed with one holder for a while.
    pub(crate) fn acquire(&self, token: u64, alive: impl Fn(u64) -> bool) -> Taken {
        debug_assert_ne!(token, 0);
        // The holder this waiter watches, and since when no release has woken it: a nap
        // cut short by a signal is no release, so it does not start the watch again.
        let mut watched: Option<(u64, Instant)> = None;
        let mut yielded = false;
        loop {
            if self.try_take(token) {
                return Taken::Free;
            }
            if self.spin_alone() {
                continue;
            }
            let holder = self.owner.load(Ordering::Acquire);
            // Only a holder that kept the lock through a whole nap is asked about.
            if holder != 0 && watched.is_some_and(|(h, since)| h == holder && since.elapsed() >= NAP) && !alive(holder)
            {
                if self.owner.compare_exchange(holder, token, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                    return Taken::FromDead(holder);
                }
                continue;
            }
            if !yielded {
                // Before sleeping, give this CPU away once: with more processes than
                // cores, the holder may be waiting for it.
                yielded = true;
                std::thread::yield_now();
                continue;
            }
            yielded = false;
            let before = Instant::now();
            watched = match self.nap() {
                Nap::Woken => None,
                Nap::Whole | Nap::Interrupted => match watched {
                    Some((h, since)) if h == holder => Some((h, since)),
                    _ => Some((holder, before)),
                },
            };
        }
    }

    /// Takes the lock if it is free.
    fn try_take(&self, token: u64) -> bool {
        self.owner.compare_exchange(0, token, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    /// Spins ([`spin`](Self::spin)) unless another waiter is spinning already; whether the
    /// lock was seen free. Waiters beyond the first do not spin: on a machine with more
    /// waiting processes than free cores, spinners would take the holder's core.
    fn spin_alone(&self) -> bool {
        let now = monotonic_ns();
        let spin = SPIN.as_nanos() as u64;
        let other = self.spinner.load(Ordering::Relaxed);
        // A deadline that has passed is nobody's (a spinner that died leaves one), and so
        // is one further ahead than a spin lasts: left by a boot before this one, or by a
        // process whose clock differs (another time namespace).
        let taken = other > now && other <= now + spin;
        if taken || self.spinner.compare_exchange(other, now + spin, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return false;
        }
        let free = self.spin();
        // Unless a waiter that found this deadline passed spins in its turn.
        let _ = self.spinner.compare_exchange(now + spin, 0, Ordering::Relaxed, Ordering::Relaxed);
        free
    }

    /// Watches the owner word for up to [`SPIN`]; whether it was seen free.
    fn spin(&self) -> bool {
        let until = Instant::now() + SPIN;
        loop {
            for _ in 0..64 {
                if self.owner.load(Ordering::Relaxed) == 0 {
                    return true;
                }
                std::hint::spin_loop();
            }
            if Instant::now() >= until {
                return false;
            }
        }
    }

    /// Sleeps until a release wakes this thread or [`NAP`] passes.
    fn nap(&self) -> Nap {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let seq = self.seq.load(Ordering::SeqCst);
        // A release after the count went up either changes `seq` (and the wait returns at
        // once) or wakes this thread; a release before it is seen here.
        let nap = if self.owner.load(Ordering::SeqCst) == 0 {
            Nap::Woken
        } else {
            let nap = futex::Timespec { tv_sec: 0, tv_nsec: NAP.as_nanos() as _ };
            match futex::wait(self.seq, futex::Flags::empty(), seq, Some(&nap)) {
                Err(rustix::io::Errno::TIMEDOUT) => Nap::Whole,
                // A signal handler ran: with a timeout, the kernel never restarts the wait.
                Err(rustix::io::Errno::INTR) => Nap::Interrupted,
                _ => Nap::Woken,
            }
        };
        // Never below zero: a release may have taken this thread's count for a dead one's.
        let _ = self.sleepers.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        nap
    }

    /// Releases the lock held by `token`, and wakes a sleeper if there is one. Does nothing
    /// if `token` does not hold it.
    pub(crate) fn release(&self, token: u64) {
        if self.owner.compare_exchange(token, 0, Ordering::SeqCst, Ordering::Relaxed).is_err() {
            return;
        }
        let sleepers = self.sleepers.load(Ordering::SeqCst);
        if sleepers > 0 {
            self.seq.fetch_add(1, Ordering::SeqCst);
            match futex::wake(self.seq, futex::Flags::empty(), 1) {
                Ok(0) => self.woke_nobody(sleepers),
                Ok(_) if self.idle_wakes.load(Ordering::Relaxed) != 0 => self.idle_wakes.store(0, Ordering::Relaxed),
                _ => {}
            }
        }
    }

    /// After a release's wake found nobody asleep though `sleepers` said so: after
    /// [`STALE_AFTER`] such wakes in a row, one sleeper is taken for dead.
    fn woke_nobody(&self, sleepers: u32) {
        if self.idle_wakes.fetch_add(1, Ordering::Relaxed) + 1 >= STALE_AFTER {
            self.idle_wakes.store(0, Ordering::Relaxed);
            let _ = self.sleepers.compare_exchange(sleepers, sleepers - 1, Ordering::SeqCst, Ordering::Relaxed);
        }
    }

    /// The token of the holder, or 0.
    #[cfg(test)]
    fn holder(&self) -> u64 {
        self.owner.load(Ordering::Acquire)
    }
}

/// Nanoseconds of `CLOCK_MONOTONIC`, which every process on the machine shares.
fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    struct Words {
        owner: AtomicU64,
        seq: AtomicU32,
        sleepers: AtomicU32,
        idle_wakes: AtomicU32,
        spinner: AtomicU64,
    }

    impl Words {
        fn new() -> Arc<Self> {
            Arc::new(Words {
                owner: AtomicU64::new(0),
                seq: AtomicU32::new(0),
                sleepers: AtomicU32::new(0),
                idle_wakes: AtomicU32::new(0),
                spinner: AtomicU64::new(0),
            })
        }
        fn lock(&self) -> IndexLock<'_> {
            IndexLock::new(&self.owner, &self.seq, &self.sleepers, &self.idle_wakes, &self.spinner)
        }
    }

    #[test]
    fn one_holder_at_a_time() {
        let words = Words::new();
        // A counter bumped with a separate load and store: any overlap of two holders
        // loses increments.
        let counter = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (1..=4u64)
            .map(|token| {
                let (words, counter) = (words.clone(), counter.clone());
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        assert_eq!(words.lock().acquire(token, |_| true), Taken::Free);
                        assert_eq!(words.lock().holder(), token);
                        let v = counter.load(Ordering::Relaxed);
                        if i % 1000 == 0 {
                            // Held long enough for the others to go to sleep.
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        counter.store(v + 1, Ordering::Relaxed);
                        words.lock().release(token);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(counter.load(Ordering::Relaxed), 80_000);
        assert_eq!(words.lock().holder(), 0);
        assert_eq!(words.sleepers.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_sleeper_is_woken_by_the_release() {
        let words = Words::new();
        assert_eq!(words.lock().acquire(1, |_| true), Taken::Free);
        let got = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (words, got) = (words.clone(), got.clone());
            std::thread::spawn(move || {
                let taken = words.lock().acquire(2, |_| true);
                got.store(true, Ordering::SeqCst);
                taken
            })
        };
        // Long enough to be asleep on the futex.
        while words.sleepers.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        assert!(!got.load(Ordering::SeqCst), "taken while held");
        let seq = words.seq.load(Ordering::SeqCst);
        words.lock().release(1);
        // The release saw the sleeper and woke it (a sleeper that missed the wake-up would
        // still get the lock, after its nap).
        assert_eq!(words.seq.load(Ordering::SeqCst), seq + 1);
        assert_eq!(waiter.join().unwrap(), Taken::Free);
        assert_eq!(words.lock().holder(), 2);
    }

    #[test]
    fn sleepers_killed_asleep_stop_costing_a_wake_per_release() {
        let words = Words::new();
        // Three processes were killed on the futex: their counts stay.
        words.sleepers.store(3, Ordering::SeqCst);
        let mut releases = 0;
        while words.sleepers.load(Ordering::SeqCst) > 0 {
            assert_eq!(words.lock().acquire(1, |_| true), Taken::Free);
            words.lock().release(1);
            releases += 1;
            assert!(releases <= 3 * STALE_AFTER, "still {} sleepers", words.sleepers.load(Ordering::SeqCst));
        }
        assert_eq!(releases, 3 * STALE_AFTER);
        // With the count right again, a release makes no wake call: `seq` stays.
        let seq = words.seq.load(Ordering::SeqCst);
        assert_eq!(words.lock().acquire(1, |_| true), Taken::Free);
        words.lock().release(1);
        assert_eq!(words.seq.load(Ordering::SeqCst), seq);
        assert_eq!(words.idle_wakes.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_sleeper_never_takes_the_count_below_zero() {
        let words = Words::new();
        // The count was taken for a dead sleeper's while this one slept: its own
        // decrement stops at zero.
        assert_eq!(words.lock().acquire(1, |_| true), Taken::Free);
        let waiter = {
            let words = words.clone();
            std::thread::spawn(move || words.lock().acquire(2, |_| true))
        };
        while words.sleepers.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        words.sleepers.store(0, Ordering::SeqCst);
        // No wake (the count says nobody sleeps): the waiter takes the lock after its nap.
        words.lock().release(1);
        assert_eq!(waiter.join().unwrap(), Taken::Free);
        assert_eq!(words.sleepers.load(Ordering::SeqCst), 0);
        words.lock().release(2);
    }

    #[test]
    fn a_stale_spinner_deadline_stops_nobody_from_spinning() {
        let words = Words::new();
        // A deadline long gone (a spinner that died), and one further ahead than any spin
        // (another boot, another clock): the next waiter spins, sees the lock free, and
        // leaves the word as it found it or cleared.
        for stale in [1, monotonic_ns() + 3_600_000_000_000] {
            words.spinner.store(stale, Ordering::Relaxed);
            assert!(words.lock().spin_alone(), "deadline {stale}");
            assert_eq!(words.spinner.load(Ordering::Relaxed), 0);
        }
    }

    #[test]
    fn a_dead_holder_is_taken_over_and_a_live_one_is_not() {
        let words = Words::new();
        // Token 7 holds it and "dies": nothing will release it.
        assert_eq!(words.lock().acquire(7, |_| true), Taken::Free);
        let asked = AtomicU64::new(0);
        let taken = words.lock().acquire(8, |t| {
            asked.fetch_add(1, Ordering::Relaxed);
            assert_eq!(t, 7);
            false
        });
        assert_eq!(taken, Taken::FromDead(7));
        assert_eq!(asked.load(Ordering::Relaxed), 1);
        assert_eq!(words.lock().holder(), 8);

        // A live holder keeps it: the waiter is still waiting after several naps.
        let waiter = {
            let words = words.clone();
            std::thread::spawn(move || words.lock().acquire(9, |t| t == 8))
        };
        std::thread::sleep(NAP * 4);
        assert_eq!(words.lock().holder(), 8);
        // A release by a token that does not hold it changes nothing.
        words.lock().release(9);
        assert_eq!(words.lock().holder(), 8);
        words.lock().release(8);
        assert_eq!(waiter.join().unwrap(), Taken::Free);
        assert_eq!(words.lock().holder(), 9);
    }

    #[test]
    fn a_dead_holder_is_taken_over_though_signals_interrupt_the_naps() {
        use std::os::unix::thread::JoinHandleExt;
        extern "C" fn on_signal(_: libc::c_int) {}
        // A process with a signal handler (a timer, SIGCHLD of the workers it runs, a
        // profiler): even with SA_RESTART, a futex wait with a timeout ends in EINTR.
        // SAFETY: the handler does nothing.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
        }
        let words = Words::new();
        // Token 7 takes the lock and dies.
        assert_eq!(words.lock().acquire(7, |_| true), Taken::Free);
        let done = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (words, done) = (words.clone(), done.clone());
            std::thread::spawn(move || {
                let taken = words.lock().acquire(8, |t| t != 7);
                done.store(true, Ordering::SeqCst);
                taken
            })
        };
        let started = Instant::now();
        // One signal every 2 ms, for up to 2 s (200 naps' worth).
        while !done.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(2) {
            // SAFETY: the thread is alive until `done` (it is joined below).
            unsafe { libc::pthread_kill(waiter.as_pthread_t(), libc::SIGUSR1) };
            std::thread::sleep(Duration::from_millis(2));
        }
        let taken_over = done.load(Ordering::SeqCst);
        if !taken_over {
            words.lock().release(7); // let the waiter go
        }
        let taken = waiter.join().unwrap();
        assert!(taken_over, "a dead holder's lock was not taken over in {:?} of signals", started.elapsed());
        assert_eq!(taken, Taken::FromDead(7));
    }
}
