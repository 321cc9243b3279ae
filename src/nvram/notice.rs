//! The death notice: how a standby learns that the nvhv running an image
//! will never write it again, before the kernel has torn that process down.
//!
//! A process killed with SIGKILL frees its image lock (`flock`) only when
//! its descriptors close, and the kernel closes them after it has unmapped
//! the process's memory and destroyed its KVM VM: 1.5–3 ms here for a VM of
//! 256 MiB–6 GiB, all of it on a standby's path to the first reply. But the
//! one thing a standby must know before it touches the image is narrower:
//! that the thread writing the image is gone.
//!
//! So the thread that writes the image (the main thread, which runs the
//! epochs) holds a robust, process-shared mutex in one page of a `memfd`,
//! from before its control socket serves anyone until it has written the
//! image for the last time, and a standby gets the `memfd` over the control
//! socket and locks the mutex. The kernel marks a robust mutex
//! `FUTEX_OWNER_DIED` and wakes its waiter when the owning thread *begins*
//! to exit (its robust list is walked before its memory is released), and
//! a thread that is exiting has left its last system call: after that no
//! write of it can land in the image. The lock then returns `EOWNERDEAD`.
//! An orderly end unlocks it ([`Ended::Released`]); the writer's last write
//! is then behind it as well.
//!
//! The rule this rests on: **only the thread holding the notice writes the
//! image once the control socket is up.** (Recovery's threads write before;
//! the write-back thread only asks the kernel to start writing what is
//! already in the page cache.)
//!
//! The image lock itself is still held by the dying process for a while;
//! what keeps a third process from taking the image in that gap is the
//! standby's successor lock (`nvram::Successor`).

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The size of the shared page.
const PAGE: usize = 4096;

/// Errors of the death notice.
#[derive(Debug, thiserror::Error)]
pub enum NoticeError {
    /// Making the shared page failed.
    #[error("cannot make the death notice")]
    Make(#[source] io::Error),
    /// The descriptor handed over is not a notice page.
    #[error("the death notice handed over is not one ({0} bytes)")]
    NotANotice(u64),
    /// A pthread call on the shared mutex failed.
    #[error("death notice: {0}")]
    Mutex(#[source] io::Error),
}

/// One shared page holding the mutex; unmapped when dropped.
struct Page {
    mutex: *mut libc::pthread_mutex_t,
}

impl Page {
    fn map(fd: &OwnedFd) -> Result<Page, NoticeError> {
        // SAFETY: a new shared mapping of PAGE bytes of a memfd whose size
        // the caller checked or set; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(NoticeError::Make(io::Error::last_os_error()));
        }
        Ok(Page {
            mutex: p.cast::<libc::pthread_mutex_t>(),
        })
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; nothing refers
        // to it afterwards (the mutex is unlocked before, see its users).
        unsafe { libc::munmap(self.mutex.cast(), PAGE) };
    }
}

/// A new `memfd` of `len` bytes (zero-filled).
fn memfd(len: u64) -> io::Result<OwnedFd> {
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor is
    // owned at once.
    let raw = unsafe { libc::memfd_create(c"nvhv-notice".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    File::from(fd.try_clone()?).set_len(len)?;
    Ok(fd)
}

fn check(r: libc::c_int) -> Result<(), NoticeError> {
    match r {
        0 => Ok(()),
        e => Err(NoticeError::Mutex(io::Error::from_raw_os_error(e))),
    }
}

/// The notice as its writer holds it. Not `Send`: a mutex is unlocked by
/// the thread that locked it, and that thread is the one the notice is about.
pub struct Held {
    page: Page,
    fd: OwnedFd,
    _this_thread: PhantomData<*const ()>,
}

impl Held {
    /// Makes the page and locks its mutex on the calling thread, which must
    /// be the one that writes the image from now on.
    pub fn hold() -> Result<Held, NoticeError> {
        let fd = memfd(PAGE as u64).map_err(NoticeError::Make)?;
        let page = Page::map(&fd)?;
        // SAFETY: the attribute and the mutex live in memory of ours (the
        // attribute on the stack, the mutex in the zero-filled page, large
        // and aligned enough for it); each is initialised before use, the
        // attribute destroyed after. Nobody else has the page yet.
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            check(libc::pthread_mutexattr_init(&mut attr))?;
            let made = check(libc::pthread_mutexattr_setpshared(
                &mut attr,
                libc::PTHREAD_PROCESS_SHARED,
            ))
            .and_then(|()| {
                check(libc::pthread_mutexattr_setrobust(
                    &mut attr,
                    libc::PTHREAD_MUTEX_ROBUST,
                ))
            })
            .and_then(|()| check(libc::pthread_mutex_init(page.mutex, &attr)));
            libc::pthread_mutexattr_destroy(&mut attr);
            made?;
            check(libc::pthread_mutex_lock(page.mutex))?;
        }
        Ok(Held {
            page,
            fd,
            _this_thread: PhantomData,
        })
    }

    /// A descriptor of the page, to hand to a standby.
    pub fn share(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // ORDER: the holder's last image write is behind it (it is dropped
        // at the end of the run); unlocked before the page is unmapped, so
        // the mutex leaves this thread's robust list while it is mapped.
        // SAFETY: locked by this thread in `hold` (`Held` is not `Send`).
        unsafe { libc::pthread_mutex_unlock(self.page.mutex) };
    }
}

/// How the writer's hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Its thread died holding it (a crash, or the process ending).
    Died,
    /// It let go in order, after its last write.
    Released,
}

/// Waits until the writer that shared `fd` lets go of it or dies.
pub fn wait(fd: OwnedFd) -> Result<Ended, NoticeError> {
    let len = File::from(fd.try_clone().map_err(NoticeError::Make)?)
        .metadata()
        .map_err(NoticeError::Make)?
        .len();
    if len != PAGE as u64 {
        return Err(NoticeError::NotANotice(len));
    }
    let page = Page::map(&fd)?;
    // SAFETY: the mutex was initialised by the process that shared the page
    // (the same nvhv), before its control socket handed it out. Locked
    // here, it is unlocked again before the page is unmapped.
    let ended = unsafe {
        match libc::pthread_mutex_lock(page.mutex) {
            0 => Ended::Released,
            libc::EOWNERDEAD => Ended::Died,
            e => return Err(NoticeError::Mutex(io::Error::from_raw_os_error(e))),
        }
    };
    // SAFETY: locked just above by this thread. After EOWNERDEAD the
    // unlock without `pthread_mutex_consistent` leaves it unusable, which is
    // right: nobody will hold it again.
    unsafe { libc::pthread_mutex_unlock(page.mutex) };
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_thread_letting_go_releases_and_a_dying_process_dies() {
        // Released: the holder thread drops it.
        let (tx, rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let held = Held::hold().unwrap();
            tx.send(held.share().unwrap()).unwrap();
            go_rx.recv().unwrap();
            drop(held);
        });
        let fd = rx.recv().unwrap();
        let waiter = std::thread::spawn(move || wait(fd).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiter.is_finished(), "the notice ended while it was held");
        go_tx.send(()).unwrap();
        holder.join().unwrap();
        assert_eq!(waiter.join().unwrap(), Ended::Released);

        // Died: the holder thread exits without letting go.
        let (tx, rx) = mpsc::channel();
        let holder = std::thread::spawn(move || {
            let held = Held::hold().unwrap();
            tx.send(held.share().unwrap()).unwrap();
            // The page stays mapped (leaked) as a dead process's would.
            std::mem::forget(held);
        });
        let fd = rx.recv().unwrap();
        holder.join().unwrap();
        assert_eq!(wait(fd).unwrap(), Ended::Died);
    }

    #[test]
    fn a_descriptor_that_is_not_a_notice_is_refused() {
        let f = memfd(100).unwrap();
        assert!(matches!(wait(f), Err(NoticeError::NotANotice(100))));
    }
}
