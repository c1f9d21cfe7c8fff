//! Cancellation: one token per unit of work (a CLI run, a server request), cloned to whoever
//! must see it. No process-wide flag.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
struct Inner {
    cancelled: AtomicBool,
    /// Partial files to delete if the process must exit without unwinding.
    partial_files: Mutex<Vec<PathBuf>>,
}

/// A shared cancellation flag. Clones see the same flag; long loops poll
/// [`CancelToken::is_cancelled`] between steps and stop cleanly.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<Inner>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder to stop.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Registers a partial output file that [`CancelToken::remove_partial_files`] deletes.
    pub fn track_partial_file(&self, path: &Path) {
        if let Ok(mut v) = self.0.partial_files.lock() {
            v.push(path.to_path_buf());
        }
    }

    /// Forgets a partial file (it was completed or removed by its writer).
    pub fn untrack_partial_file(&self, path: &Path) {
        if let Ok(mut v) = self.0.partial_files.lock() {
            v.retain(|p| p != path);
        }
    }

    /// Deletes the partial files still registered (before a hard exit).
    pub fn remove_partial_files(&self) {
        if let Ok(v) = self.0.partial_files.lock() {
            for f in v.iter() {
                let _ = std::fs::remove_file(f);
            }
        }
    }
}

/// Cancels its token when dropped: tie a request's token to the lifetime of whatever waits for
/// its answer (an HTTP handler future, a response stream).
#[derive(Debug)]
pub struct CancelOnDrop(pub CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_flag_and_drop_guards_cancel() {
        let t = CancelToken::new();
        let c = t.clone();
        assert!(!c.is_cancelled());
        drop(CancelOnDrop(t.clone()));
        assert!(c.is_cancelled() && t.is_cancelled());
        assert!(!CancelToken::new().is_cancelled());
    }

    #[test]
    fn partial_files_are_removed_unless_untracked() {
        let dir = std::env::temp_dir().join(format!("hici-cancel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.tmp"), dir.join("b.tmp"));
        std::fs::write(&a, "x").unwrap();
        std::fs::write(&b, "x").unwrap();
        let t = CancelToken::new();
        t.track_partial_file(&a);
        t.track_partial_file(&b);
        t.untrack_partial_file(&b);
        t.remove_partial_files();
        assert!(!a.exists() && b.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
