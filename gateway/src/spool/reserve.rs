//! The spool's reserve: a file of `spool.reserve_bytes` next to the spool, given up when
//! the disk fills so that the spool can still make room.
//!
//! When the spool is what filled its disk, SQLite cannot write even the deletes that
//! would free it: a delete is written to the WAL, which cannot start over until a
//! checkpoint has copied it into the database file, and the checkpoint needs that file to
//! grow first. Without help the gateway would hold its inputs back for good, with Kafka
//! back and the backlog never draining. The reserve is that help (CockroachDB keeps an
//! "emergency ballast" file for the same reason): taken while there is room, deleted at
//! the first full-disk error, and taken again once the file system has room for it and
//! as much again. Given up, the file stays, empty: that says so to the next run too,
//! which then keeps the spool out of the room the reserve would take.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The reserve file of one spool.
#[derive(Debug)]
pub struct Reserve {
    path: PathBuf,
    size: u64,
    held: bool,
    given_up: bool,
}

impl Reserve {
    /// The reserve of the spool at `spool`: `<spool>.reserve`, of `size` bytes (0: none).
    /// Held if the file is there at its size (kept from the last run), given up if it is
    /// there empty; nothing is written until [`Reserve::take`]. A file of another size
    /// (the setting changed) is emptied, so it counts as given up until taken again at
    /// the new size (it may have been the room a full disk needed); with no reserve
    /// wanted it is deleted, and so is a temporary one a stop cut short.
    pub fn new(spool: &Path, size: u64) -> Reserve {
        let path = with_suffix(spool, ".reserve");
        let _ = std::fs::remove_file(with_suffix(spool, ".reserve.tmp"));
        let len = std::fs::metadata(&path).map_or(None, |m| Some(m.len()));
        let held = size > 0 && len == Some(size);
        let mut given_up = size > 0 && len == Some(0);
        if len.is_some() && !held && !given_up {
            if size == 0 {
                let _ = std::fs::remove_file(&path);
            } else if std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(0))
                .is_ok()
            {
                given_up = true;
            }
        }
        Reserve {
            path,
            size,
            held,
            given_up,
        }
    }

    /// Whether the reserve was given up to a full disk (in this run or an earlier one)
    /// and not taken again: the spool then keeps its size free.
    pub fn given_up(&self) -> bool {
        self.given_up
    }

    /// The configured size (0: no reserve).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the file is there, its space taken.
    pub fn held(&self) -> bool {
        self.held
    }

    /// Bytes held now: the size, or 0 once given up.
    pub fn held_bytes(&self) -> u64 {
        if self.held {
            self.size
        } else {
            0
        }
    }

    /// The directory of the file (and of the spool).
    pub fn dir(&self) -> &Path {
        super::dir_of(&self.path)
    }

    /// The path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the reserve if it is not held and the file system has room for it and as
    /// much again (taking the last of the free space would fill the disk itself).
    /// Returns whether it is held now. The file's blocks are allocated
    /// (`posix_fallocate`, or written where the file system cannot), made durable, and
    /// the file is written under a temporary name first, so a stop half-way never
    /// leaves a short file that counts as held.
    pub fn take(&mut self) -> std::io::Result<bool> {
        if self.held || self.size == 0 {
            return Ok(self.held);
        }
        if available(self.dir())? < self.size.saturating_mul(2) {
            return Ok(false);
        }
        let tmp = with_suffix(&self.path, ".tmp");
        let made = fill(&tmp, self.size).and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = made {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // In place: held, whether or not its name is durable yet (a later run finds it
        // or takes it again).
        self.held = true;
        self.given_up = false;
        super::sync_dir(&self.path)?;
        Ok(true)
    }

    /// Gives the reserve up: the file is truncated to nothing (which needs no room on a
    /// full disk, and leaves the mark a later run reads). Returns whether it was held.
    /// Given up even when that fails (someone deleted the file to make room: the mark is
    /// made again if it can be), so the spool keeps out of the room from then on and the
    /// error comes once.
    pub fn release(&mut self) -> std::io::Result<bool> {
        if !self.held {
            return Ok(false);
        }
        self.held = false;
        self.given_up = true;
        let file = match std::fs::OpenOptions::new().write(true).open(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let _ = std::fs::File::create(&self.path);
                return Ok(true);
            }
            opened => opened?,
        };
        file.set_len(0)?;
        // Best effort: the room is free either way, and a full disk may refuse the sync.
        let _ = file.sync_all();
        Ok(true)
    }

    /// Whether the file system has less room left than the reserve's size: an I/O error
    /// then may well be a full disk.
    pub fn short_of_room(&self) -> bool {
        available(self.dir()).is_ok_and(|a| a < self.size)
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Bytes an unprivileged process may still write on the file system holding `dir`.
pub fn available(dir: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
}

/// Creates `path` with `size` bytes of allocated blocks, synced.
fn fill(path: &Path, size: u64) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    // off_t: 32 bits on 32-bit ARM without large-file offsets.
    let len = nix::libc::off_t::try_from(size)
        .map_err(|_| std::io::Error::other("reserve size too large for this platform"))?;
    match nix::fcntl::posix_fallocate(&f, 0, len) {
        Ok(()) => {}
        // A file system without fallocate (glibc emulates it, but not everywhere):
        // real bytes. Not zeros, which a compressing file system would not store.
        Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL) => {
            let block: Vec<u8> = (0..64 * 1024u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
                .collect();
            let mut left = size;
            while left > 0 {
                let n = left.min(block.len() as u64) as usize;
                f.write_all(&block[..n])?;
                left -= n as u64;
            }
        }
        Err(e) => return Err(e.into()),
    }
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_is_taken_given_up_and_found_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("spool.sqlite");
        let mut r = Reserve::new(&spool, 1 << 20);
        assert!(!r.held());
        assert!(r.take().expect("room on a temp dir"));
        assert_eq!(
            std::fs::metadata(dir.path().join("spool.sqlite.reserve"))
                .expect("file")
                .len(),
            1 << 20
        );
        assert_eq!(r.held_bytes(), 1 << 20);
        // A later run finds it held.
        assert!(Reserve::new(&spool, 1 << 20).held());
        assert!(!r.given_up());
        assert!(r.release().expect("release"));
        assert!(!r.held() && r.given_up());
        assert_eq!(std::fs::metadata(r.path()).expect("marker").len(), 0);
        assert!(!r.release().expect("twice is nothing"));
        // Deleted by hand to make room: given up all the same, the mark made again.
        let mut gone = Reserve::new(&spool, 1 << 20);
        assert!(gone.take().expect("room"));
        std::fs::remove_file(gone.path()).expect("delete");
        assert!(gone.release().expect("given up"));
        assert!(gone.given_up() && !gone.held());
        assert_eq!(std::fs::metadata(gone.path()).expect("mark").len(), 0);
        // A later run finds it given up, until it is taken again.
        let mut again = Reserve::new(&spool, 1 << 20);
        assert!(!again.held() && again.given_up());
        assert!(again.take().expect("room"));
        assert!(again.held() && !again.given_up());
    }

    #[test]
    fn a_reserve_of_another_size_or_cut_short_is_not_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("spool.sqlite");
        assert!(Reserve::new(&spool, 1 << 20).take().expect("room"));
        let file = dir.path().join("spool.sqlite.reserve");
        let tmp = dir.path().join("spool.sqlite.reserve.tmp");
        std::fs::write(&tmp, b"cut short").expect("write");
        // The setting changed: the old file is emptied (given up until taken at the new
        // size), and the temporary one goes.
        let mut r = Reserve::new(&spool, 2 << 20);
        assert!(!r.held() && r.given_up() && !tmp.exists());
        assert_eq!(std::fs::metadata(&file).expect("mark").len(), 0);
        assert!(r.take().expect("room"));
        assert_eq!(std::fs::metadata(&file).expect("file").len(), 2 << 20);
        // No reserve wanted: none kept.
        assert!(!Reserve::new(&spool, 0).held());
        assert!(!file.exists());
    }

    #[test]
    fn no_reserve_is_taken_without_room_for_it_twice_or_when_its_size_is_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("spool.sqlite");
        let free = available(dir.path()).expect("statvfs");
        let mut r = Reserve::new(&spool, free / 2 + (1 << 20));
        assert!(!r.take().expect("not an error"));
        assert!(!r.path().exists());
        let mut none = Reserve::new(&spool, 0);
        assert!(!none.take().expect("nothing to take"));
        assert_eq!(none.held_bytes(), 0);
    }
}
