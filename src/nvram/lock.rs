//! Who may write an image: its owner's lock, and a standby's successor lock.
//!
//! **The owner** holds an exclusive `flock` on the image file for as long as
//! it has the image open (`run`, `resume`, a standby once it took over).
//! Every opener takes it without waiting and fails with
//! [`ImageError::InUse`] if another process has it; `inspect` probes it
//! with a shared lock it releases at once.
//!
//! **A successor** is a standby (`nvhv resume --standby`). It holds an
//! open-file-description write lock (`F_OFD_SETLK`) on the image's first
//! byte, [`Successor`], from before it stands by until it holds the `flock`
//! itself. A standby takes the image over as soon as the writer of the
//! process it replaces is gone (`nvram::notice`), while that dying process
//! still holds the `flock` for a few milliseconds of teardown; when the
//! kernel then frees the `flock`, another process could take it in the
//! moment before the standby does. So every opener that got the `flock`
//! also checks that no other process holds the successor lock, and backs
//! off with [`ImageError::InUse`] if one does: the image is in use while
//! either lock is held by someone else. One successor at a time: a second
//! standby waits for the successor lock before it stands by.
//!
//! The two kinds of lock are independent on Linux (`flock` and OFD locks
//! never conflict with each other) and both vanish with the process.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::image::{open_rw, ImageError};

/// Takes `op` (`LOCK_EX` or `LOCK_SH`) on `file` without blocking, and
/// checks that no successor holds the image. [`ImageError::InUse`] if
/// another open file description holds a conflicting `flock`, or another
/// process the successor lock.
pub(super) fn lock(file: &File, path: &Path, op: libc::c_int) -> Result<(), ImageError> {
    flock(file, path, op | libc::LOCK_NB)?;
    match successor_holds(file) {
        Ok(false) => Ok(()),
        Ok(true) => {
            unlock(file);
            Err(ImageError::InUse(path.to_owned()))
        }
        Err(e) => {
            unlock(file);
            Err(lock_error(path)(e))
        }
    }
}

/// Takes `LOCK_EX` on `file`, waiting for whoever holds it to let go. Only
/// for a [`Successor`] (it checks no successor lock: the caller holds it).
pub(super) fn wait_lock(file: &File, path: &Path) -> Result<(), ImageError> {
    flock(file, path, libc::LOCK_EX)
}

fn flock(file: &File, path: &Path, op: libc::c_int) -> Result<(), ImageError> {
    loop {
        // SAFETY: flock on an fd we own; no memory is involved.
        let r = unsafe { libc::flock(file.as_raw_fd(), op) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if op & libc::LOCK_NB != 0 => {
                return Err(ImageError::InUse(path.to_owned()))
            }
            _ => return Err(lock_error(path)(e)),
        }
    }
}

/// Releases a lock taken with [`lock`].
pub(super) fn unlock(file: &File) {
    // SAFETY: flock on an fd we own; no memory is involved. A failure leaves
    // the lock to be dropped with the fd, which happens soon after anyway.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}

/// The byte range of the successor lock: the image's first byte.
fn successor_range(l_type: libc::c_short) -> libc::flock {
    libc::flock {
        l_type,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 1,
        l_pid: 0,
    }
}

/// Whether another open file description holds the successor lock of the
/// file `file` is open on.
fn successor_holds(file: &File) -> io::Result<bool> {
    let mut probe = successor_range(libc::F_WRLCK as libc::c_short);
    // SAFETY: F_OFD_GETLK reads and writes the flock struct we pass, which
    // lives on our stack for the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut probe) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(probe.l_type != libc::F_UNLCK as libc::c_short)
}

/// A standby's claim to be the next owner of an image: while it lives, no
/// other process can open the image (see the module header). Released when
/// dropped, or when the process dies.
#[derive(Debug)]
pub struct Successor {
    file: File,
}

impl Successor {
    /// Claims the image at `path`, waiting while another standby has it.
    pub fn wait(path: &Path) -> Result<Successor, ImageError> {
        let file = open_rw(path)?;
        set_successor_lock(&file, libc::F_OFD_SETLKW).map_err(lock_error(path))?;
        Ok(Successor { file })
    }

    /// Claims the image at `path` if no other standby has it (`None`).
    pub fn claim(path: &Path) -> Result<Option<Successor>, ImageError> {
        let file = open_rw(path)?;
        match set_successor_lock(&file, libc::F_OFD_SETLK) {
            Ok(()) => Ok(Some(Successor { file })),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => Ok(None),
            Err(e) => Err(lock_error(path)(e)),
        }
    }

    /// The file the claim was made on: the one at the path then.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Takes the claim's write lock on `file` with `cmd` (`F_OFD_SETLK` or
/// `F_OFD_SETLKW`), retrying when a signal interrupts the wait.
fn set_successor_lock(file: &File, cmd: libc::c_int) -> io::Result<()> {
    let mut l = successor_range(libc::F_WRLCK as libc::c_short);
    loop {
        // SAFETY: F_OFD_SETLK(W) reads the flock struct we pass, which
        // lives on our stack for the call.
        if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut l) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// [`ImageError::Lock`] for `path`, as a `map_err` adapter.
fn lock_error(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Lock {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvram::image::tests::TempPath;

    #[test]
    fn a_successor_keeps_every_other_opener_out_until_it_lets_go() {
        let t = TempPath::new("successor");
        std::fs::write(&t.0, b"image").unwrap();
        let a = open_rw(&t.0).unwrap();
        let b = open_rw(&t.0).unwrap();
        lock(&a, &t.0, libc::LOCK_EX).unwrap();
        unlock(&a);

        let s = Successor::wait(&t.0).unwrap();
        // The flock is free, but the image is claimed.
        assert!(matches!(
            lock(&a, &t.0, libc::LOCK_EX),
            Err(ImageError::InUse(_))
        ));
        assert!(matches!(
            lock(&b, &t.0, libc::LOCK_SH),
            Err(ImageError::InUse(_))
        ));
        // Backing off released the flock it had taken: the successor's own
        // wait gets it at once.
        wait_lock(s.file(), &t.0).unwrap();
        // An owner's flock keeps others out as before.
        assert!(matches!(
            lock(&a, &t.0, libc::LOCK_EX),
            Err(ImageError::InUse(_))
        ));
        unlock(s.file());
        drop(s);
        lock(&a, &t.0, libc::LOCK_EX).unwrap();
        // A flock never blocks a successor's claim (they are independent),
        // and a second claim waits for the first.
        let s1 = Successor::wait(&t.0).unwrap();
        let path = t.0.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let second = std::thread::spawn(move || {
            let s2 = Successor::wait(&path).unwrap();
            tx.send(()).unwrap();
            s2
        });
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(50))
            .is_err());
        drop(s1);
        rx.recv().unwrap();
        drop(second.join().unwrap());
    }
}
