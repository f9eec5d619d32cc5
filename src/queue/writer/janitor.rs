//! A helper thread for the slow file-system work of generations, so that the writer (and every
//! sender waiting on its commit) does not wait for it: creating the next generation ahead of
//! time, and closing and removing delivered ones. Each takes milliseconds to tens of
//! milliseconds (sled's open and close, fsyncs, unlinking files of tens of MiB), and a fast
//! ingest seals a generation several times a second.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::queue::generation::{self, GenDb, Generation};
use crate::queue::record;
use crate::queue::QueueError;

type Made = Result<Arc<Generation>, QueueError>;

enum Chore {
    Create {
        gen: Arc<Generation>,
        done: Sender<Made>,
    },
    /// Close a database (drop the last handle) and give its memory back.
    Close { db: Arc<GenDb> },
    /// Close a deleted generation and remove its files.
    Remove {
        db: Option<Arc<GenDb>>,
        doomed: PathBuf,
    },
}

pub(super) struct Janitor {
    root: PathBuf,
    chores: Option<Sender<Chore>>,
    thread: Option<JoinHandle<()>>,
    /// The next generation, being created.
    spare: Option<(u64, Receiver<Made>)>,
}

impl Janitor {
    pub fn start(root: PathBuf) -> std::io::Result<Janitor> {
        let (tx, rx) = channel();
        let thread_root = root.clone();
        let thread = std::thread::Builder::new()
            .name("queue-janitor".into())
            .spawn(move || run(&thread_root, rx))?;
        Ok(Janitor {
            root,
            chores: Some(tx),
            thread: Some(thread),
            spare: None,
        })
    }

    fn send(&self, chore: Chore) {
        let sent = self.chores.as_ref().map(|tx| tx.send(chore));
        if !matches!(sent, Some(Ok(()))) {
            tracing::warn!("queue janitor gone; a generation's files stay until the next start");
        }
    }

    /// Starts creating `gen`, the generation after the active one.
    pub fn prepare(&mut self, gen: Arc<Generation>) {
        let (done, wait) = channel();
        self.spare = Some((gen.id, wait));
        self.send(Chore::Create { gen, done });
    }

    /// The generation `id`, created and open, if it was prepared; waits for it if it is still
    /// being made. `None` if it was not prepared or could not be made (the caller makes it).
    pub fn take_spare(&mut self, id: u64) -> Option<Arc<Generation>> {
        let (spare_id, wait) = self.spare.take()?;
        if spare_id != id {
            return None;
        }
        match wait.recv() {
            Ok(Ok(gen)) => Some(gen),
            Ok(Err(e)) => {
                tracing::warn!(generation = id, error = %e, "could not prepare the next queue generation");
                None
            }
            Err(_) => None,
        }
    }

    pub fn close(&self, db: Arc<GenDb>) {
        self.send(Chore::Close { db });
    }

    pub fn remove(&self, db: Option<Arc<GenDb>>, doomed: PathBuf) {
        self.send(Chore::Remove { db, doomed });
    }

    /// Deletes the prepared generation, unused: a clean stop leaves no empty generation behind
    /// (the next start would take it for the active one, and count the real one by opening it).
    pub fn discard_spare(&mut self) {
        let Some(id) = self.spare.as_ref().map(|(id, _)| *id) else {
            return;
        };
        let Some(gen) = self.take_spare(id) else {
            return;
        };
        if let Some(db) = gen.retire() {
            match generation::commit_deletion(&self.root, &gen) {
                Ok(doomed) => self.remove(db, doomed),
                Err(e) => {
                    tracing::warn!(generation = id, error = %e, "cannot remove the unused next generation")
                }
            }
        }
    }
}

impl Drop for Janitor {
    /// Finishes the chores already asked for.
    fn drop(&mut self) {
        self.chores = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(root: &std::path::Path, chores: Receiver<Chore>) {
    for chore in chores {
        match chore {
            Chore::Create { gen, done } => {
                let made = generation::create_generation(root, &gen, record::FORMAT_VERSION);
                let _ = done.send(made.map(|()| gen));
            }
            Chore::Close { db } => {
                drop(db);
                generation::release_freed_memory();
            }
            Chore::Remove { db, doomed } => {
                drop(db);
                generation::remove_deleted(&doomed);
                generation::release_freed_memory();
            }
        }
    }
}
