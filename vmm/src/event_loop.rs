//! The VMM's one background event thread: relays backends' used-buffer notifications into guest
//! interrupts and notices when a backend's socket closes. Handlers can be added while it runs.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use log::{error, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// What a handler wants after it ran.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Keep,
    Remove,
}

type Handler = Box<dyn FnMut(EventSet) -> Next + Send>;

const STOP_TOKEN: u64 = 0;

pub struct EventLoop {
    epoll: Epoll,
    handlers: Mutex<HashMap<u64, (RawFd, Handler)>>,
    next_token: AtomicU64,
    stop: EventFd,
}

impl EventLoop {
    pub fn new() -> std::io::Result<Arc<Self>> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            std::os::fd::AsRawFd::as_raw_fd(&stop),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        Ok(Arc::new(Self {
            epoll,
            handlers: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(STOP_TOKEN + 1),
            stop,
        }))
    }

    /// Calls `handler` whenever `fd` has any of `events`; the fd must stay open until the
    /// handler returns `Next::Remove` or `remove` is called with the returned token.
    pub fn add(
        &self,
        fd: RawFd,
        events: EventSet,
        handler: impl FnMut(EventSet) -> Next + Send + 'static,
    ) -> std::io::Result<u64> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let mut handlers = self.lock();
        handlers.insert(token, (fd, Box::new(handler) as Handler));
        // Registered under the lock, so a concurrent removal of an old registration of the
        // same fd number cannot delete this one.
        let added = self
            .epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token));
        if added.is_err() {
            handlers.remove(&token);
        }
        added.map(|()| token)
    }

    /// Drops the registration `token` (a no-op if its handler already asked to be removed).
    pub fn remove(&self, token: u64) {
        let mut handlers = self.lock();
        if let Some((fd, _)) = handlers.remove(&token) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// Runs the loop on a thread of its own until `stop` is called.
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let this = self.clone();
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || this.run())
    }

    pub fn stop(&self) {
        if let Err(e) = self.stop.write(1) {
            warn!("could not stop the event loop: {e}");
        }
    }

    fn run(&self) {
        crate::seccomp::confine(crate::seccomp::ThreadKind::EventLoop);
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let count = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("the VMM event loop failed and stops: {e}");
                    return;
                }
            };
            for event in &events[..count] {
                if event.data() == STOP_TOKEN {
                    return;
                }
                self.dispatch(event.data(), event.event_set());
            }
        }
    }

    fn dispatch(&self, token: u64, events: EventSet) {
        // Handlers run under the lock: they are short (read an eventfd, raise an irqfd) and
        // this keeps a concurrent `add` from racing with removal.
        let mut handlers = self.lock();
        let Some((fd, handler)) = handlers.get_mut(&token) else {
            return;
        };
        if handler(events) == Next::Remove {
            let fd = *fd;
            handlers.remove(&token);
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (RawFd, Handler)>> {
        self.handlers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn handlers_run_until_they_ask_to_be_removed() {
        let events = EventLoop::new().unwrap();
        let thread = events.spawn().unwrap();
        let fd = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let (tx, rx) = mpsc::channel();
        let reader = fd.clone();
        events
            .add(fd.as_raw_fd(), EventSet::IN, move |_| {
                let value = reader.read().unwrap_or(0);
                tx.send(value).unwrap();
                if value >= 5 {
                    Next::Remove
                } else {
                    Next::Keep
                }
            })
            .unwrap();
        fd.write(2).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 2);
        fd.write(5).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 5);
        fd.write(1).unwrap();
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "removed"
        );
        events.stop();
        thread.join().unwrap();
    }
}
