//! Image locking that QEMU understands: open-file-description byte-range locks on the image file itself.
//!
//! QEMU's file driver says what an open may do, and what it lets others do, with one-byte read locks
//! (`F_OFD_SETLK`): byte `100 + p` is held by every open that uses permission `p`, and byte `200 + p` by every
//! open that does not share it. Before it goes on, an open asks (`F_OFD_GETLK`) whether anybody else holds
//! `200 + p` for a permission it uses, or `100 + p` for one it does not share. Taking the same bytes with the same
//! meaning is what makes a running QEMU and this library refuse each other's writes: neither can tell the other
//! apart from another instance of itself.
//!
//! The locks belong to the open file description, so they go away when the file is closed, and two opens of one
//! file in one process do see each other (unlike classic POSIX locks).

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// How a [`FileDevice`](super::FileDevice) locks its file against other users.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Locking {
    /// As QEMU's file driver does by default: a read-write open uses and refuses to share writes and resizes; a
    /// read-only open refuses to share them too, so nobody changes the image under a reader.
    #[default]
    Qemu,
    /// A read-only open that shares everything (`qemu-img -U`, `force-share=on`): it reads an image another
    /// process may be writing, and accepts that what it reads can be inconsistent. Refused for read-write opens.
    ForceShare,
    /// No locks at all: for files that are not images, or for callers that exclude each other some other way.
    Off,
}

/// One of QEMU's block permissions, by its bit number, as the lock bytes count them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Permission {
    ConsistentRead = 0,
    Write = 1,
    WriteUnchanged = 2,
    Resize = 3,
}

impl Permission {
    const ALL: [Permission; 4] =
        [Permission::ConsistentRead, Permission::Write, Permission::WriteUnchanged, Permission::Resize];

    /// The name QEMU's messages give the permission.
    fn name(self) -> &'static str {
        match self {
            Permission::ConsistentRead => "consistent read",
            Permission::Write => "write",
            Permission::WriteUnchanged => "write unchanged",
            Permission::Resize => "resize",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// The byte held by opens that use the permission.
    fn used_byte(self) -> i64 {
        100 + self as i64
    }

    /// The byte held by opens that do not share it.
    fn unshared_byte(self) -> i64 {
        200 + self as i64
    }
}

/// What an open uses and what it shares, as permission bit sets.
struct Permissions {
    used: u8,
    shared: u8,
}

impl Permissions {
    fn of(read_write: bool, locking: Locking) -> Permissions {
        let all = Permission::ALL.iter().fold(0, |set, p| set | p.bit());
        let read = Permission::ConsistentRead.bit();
        let changes = Permission::Write.bit() | Permission::Resize.bit();
        match (read_write, locking) {
            // What qemu-io and qemu-img leave in /proc/locks for a qcow2 image opened read-write or read-only.
            (true, _) => Permissions { used: read | changes, shared: all & !changes },
            (false, Locking::ForceShare) => Permissions { used: read, shared: all },
            (false, _) => Permissions { used: read, shared: all & !changes },
        }
    }
}

/// Takes the locks `locking` asks for on `file` (opened read-write when `read_write`), then checks that no other
/// open holds a conflicting one. A file system without OFD locks gets no locks, as QEMU's `locking=auto` does.
///
/// # Errors
/// [`Error::Locked`] naming the first conflicting permission; `InvalidArgument` for [`Locking::ForceShare`] on a
/// read-write open; `Io` when the lock calls fail for another reason.
pub(super) fn lock(file: &File, path: &Path, read_write: bool, locking: Locking) -> Result<()> {
    match locking {
        Locking::Off => return Ok(()),
        Locking::ForceShare if read_write => {
            return Err(Error::invalid("open", "force-share can only be used with read-only opens"));
        }
        Locking::Qemu | Locking::ForceShare => {}
    }
    let perms = Permissions::of(read_write, locking);
    for p in Permission::ALL {
        for (byte, take) in
            [(p.used_byte(), perms.used & p.bit() != 0), (p.unshared_byte(), perms.shared & p.bit() == 0)]
        {
            if !take {
                continue;
            }
            match set_read_lock(file, byte) {
                Ok(()) => {}
                Err(e) if unsupported(&e) => return Ok(()),
                Err(e) => return Err(Error::io("lock the image file", byte as u64, e)),
            }
        }
    }
    // QEMU's order: first the permissions we use, then the ones we do not share, so the first conflict named
    // is the one qemu-img would name.
    for p in Permission::ALL {
        if perms.used & p.bit() != 0 && held_by_other(file, p.unshared_byte())? {
            return Err(Error::Locked { path: path.to_path_buf(), permission: p.name(), shared: false });
        }
    }
    for p in Permission::ALL {
        if perms.shared & p.bit() == 0 && held_by_other(file, p.used_byte())? {
            return Err(Error::Locked { path: path.to_path_buf(), permission: p.name(), shared: true });
        }
    }
    Ok(())
}

fn lock_request(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers, for which all zeros is a valid value; the fields that
    // matter are set below (l_pid must stay 0 for OFD locks).
    let mut request: libc::flock = unsafe { std::mem::zeroed() };
    request.l_type = kind as libc::c_short;
    request.l_whence = libc::SEEK_SET as libc::c_short;
    request.l_start = byte;
    request.l_len = 1;
    request
}

fn set_read_lock(file: &File, byte: i64) -> io::Result<()> {
    let request = lock_request(libc::F_RDLCK, byte);
    // SAFETY: F_OFD_SETLK reads the `flock` we pass, which lives across the call; the descriptor is open.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &request) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether another open file description holds a lock on `byte`: asked by testing for a write lock, which any
/// read lock of another description would block (our own locks never do).
fn held_by_other(file: &File, byte: i64) -> Result<bool> {
    let mut request = lock_request(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK reads and rewrites the `flock` we pass, which lives across the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut request) } != 0 {
        let e = io::Error::last_os_error();
        if unsupported(&e) {
            return Ok(false);
        }
        return Err(Error::io("test the image file's locks", byte as u64, e));
    }
    Ok(request.l_type != libc::F_UNLCK as libc::c_short)
}

/// Whether a lock call failed because the file system has no OFD locks (some network and FUSE file systems).
fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOLCK))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn open(path: &Path, read_write: bool) -> File {
        std::fs::OpenOptions::new().read(true).write(read_write).open(path).unwrap()
    }

    /// A small file in a directory of its own, which goes when the first value is dropped.
    fn image_file() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        (dir, path)
    }

    fn conflict(path: &Path, read_write: bool, locking: Locking) -> Option<(&'static str, bool)> {
        match lock(&open(path, read_write), path, read_write, locking) {
            Ok(()) => None,
            Err(Error::Locked { permission, shared, .. }) => Some((permission, shared)),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn writers_exclude_everyone_but_force_sharing_readers() {
        let (_dir, path) = image_file();
        let writer = open(&path, true);
        lock(&writer, &path, true, Locking::Qemu).unwrap();
        // A second writer wants the write permission the first does not share.
        assert_eq!(conflict(&path, true, Locking::Qemu), Some(("write", false)));
        // A reader refuses to share writes, which the writer uses.
        assert_eq!(conflict(&path, false, Locking::Qemu), Some(("write", true)));
        assert_eq!(conflict(&path, false, Locking::ForceShare), None);
        assert_eq!(conflict(&path, true, Locking::Off), None);
        drop(writer);
        assert_eq!(conflict(&path, true, Locking::Qemu), None);
    }

    #[test]
    fn readers_share_with_readers_and_keep_writers_out() {
        let (_dir, path) = image_file();
        let reader = open(&path, false);
        lock(&reader, &path, false, Locking::Qemu).unwrap();
        assert_eq!(conflict(&path, false, Locking::Qemu), None);
        assert_eq!(conflict(&path, true, Locking::Qemu), Some(("write", false)));
    }

    #[test]
    fn force_share_is_refused_for_a_read_write_open() {
        let (_dir, path) = image_file();
        let err = lock(&open(&path, true), &path, true, Locking::ForceShare).unwrap_err();
        assert!(err.to_string().contains("force-share"), "{err}");
    }
}
