//! What a file source stores as a file's checkpoint (`queue/checkpoint.rs`), and how a file is
//! recognised again: by device and inode, and a fingerprint of its first bytes, so that a file
//! that took the inode of a deleted one is not read from the old file's position.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Bytes at the start of a file that its fingerprint covers (fewer while it is shorter).
pub const FINGERPRINT_BYTES: u64 = 256;
/// The names of file checkpoints start with this; then `DEV:INO`.
pub const PREFIX: &[u8] = b"file/";
/// Version byte of [`Position`]'s encoding.
const VERSION: u8 = 1;
/// A stored position is a path and a few numbers; more is not one.
const DECODE_LIMIT: usize = 64 << 10;

/// A file, whatever its name: device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(meta: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// The name of its checkpoint.
    pub fn checkpoint_name(self) -> Vec<u8> {
        let mut name = PREFIX.to_vec();
        name.extend_from_slice(format!("{}:{}", self.dev, self.ino).as_bytes());
        name
    }

    /// The file of a checkpoint's name.
    pub fn from_checkpoint_name(name: &[u8]) -> Option<FileId> {
        let rest = std::str::from_utf8(name.strip_prefix(PREFIX)?).ok()?;
        let (dev, ino) = rest.split_once(':')?;
        Some(FileId {
            dev: dev.parse().ok()?,
            ino: ino.parse().ok()?,
        })
    }
}

/// A CRC-32 of a file's first `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Fingerprint {
    pub len: u64,
    pub crc: u32,
}

impl Fingerprint {
    /// The fingerprint of `file`'s first bytes, up to [`FINGERPRINT_BYTES`].
    pub fn of(file: &File) -> std::io::Result<Fingerprint> {
        let mut head = vec![0; FINGERPRINT_BYTES as usize];
        let n = read_fully_at(file, &mut head, 0)?;
        Ok(Fingerprint {
            len: n as u64,
            crc: crc32fast::hash(&head[..n]),
        })
    }

    /// Whether `file` starts with the bytes this fingerprint was taken of.
    pub fn matches(&self, file: &File) -> std::io::Result<bool> {
        let mut head = vec![0; self.len.min(FINGERPRINT_BYTES) as usize];
        let n = read_fully_at(file, &mut head, 0)?;
        Ok(n == head.len() && crc32fast::hash(&head) == self.crc)
    }

    /// Whether it covers all it will (the file had at least [`FINGERPRINT_BYTES`]).
    pub fn is_full(&self) -> bool {
        self.len >= FINGERPRINT_BYTES
    }
}

/// Reads into `buf` at `offset` until it is full or the file ends; the bytes read.
pub fn read_fully_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(got) => n += got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A file's checkpoint: where the next line to read starts, as durable with the events before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Where the file was last seen (to find it again if it was rotated while the forwarder
    /// was stopped, and for the logs). Stored as its bytes: a Unix path need not be UTF-8.
    #[serde(with = "path_bytes")]
    pub path: PathBuf,
    pub offset: u64,
    pub fingerprint: Fingerprint,
}

/// A stored position that this release cannot read.
#[derive(Debug, thiserror::Error)]
pub enum PositionError {
    #[error("empty checkpoint")]
    Empty,
    #[error("checkpoint version {0} (written by a newer release?)")]
    Version(u8),
    #[error("checkpoint: {0}")]
    Body(#[from] bincode::error::DecodeError),
}

/// A path as its bytes, for serde (whose own `PathBuf` refuses a path that is not UTF-8).
mod path_bytes {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Path, PathBuf};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(path.as_os_str().as_bytes())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(d)?;
        Ok(PathBuf::from(OsStr::from_bytes(&bytes)))
    }
}

impl Position {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        // Encoding to a Vec cannot fail for these types (the path is bytes, not a string).
        if let Ok(body) = bincode::serde::encode_to_vec(self, bincode::config::standard()) {
            out.extend_from_slice(&body);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Position, PositionError> {
        match bytes.split_first() {
            None => Err(PositionError::Empty),
            Some((&VERSION, body)) => {
                let config = bincode::config::standard().with_limit::<DECODE_LIMIT>();
                Ok(bincode::serde::decode_from_slice(body, config)?.0)
            }
            Some((&v, _)) => Err(PositionError::Version(v)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_position_decodes_to_itself_and_garbage_is_an_error() {
        let p = Position {
            path: "/var/log/a.log".into(),
            offset: 12345,
            fingerprint: Fingerprint { len: 256, crc: 7 },
        };
        assert_eq!(Position::decode(&p.encode()).unwrap(), p);
        assert!(Position::decode(&[]).is_err());
        assert!(Position::decode(&[9, 1, 2]).is_err());
        assert!(Position::decode(&[VERSION, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn a_path_that_is_not_utf8_is_kept() {
        use std::os::unix::ffi::OsStrExt;
        let p = Position {
            path: std::ffi::OsStr::from_bytes(b"/var/log/caf\xe9.log").into(),
            offset: 9,
            fingerprint: Fingerprint::default(),
        };
        assert_eq!(Position::decode(&p.encode()).unwrap(), p);
    }

    #[test]
    fn checkpoint_names_round_trip() {
        let id = FileId { dev: 2049, ino: 77 };
        assert_eq!(
            FileId::from_checkpoint_name(&id.checkpoint_name()),
            Some(id)
        );
        assert_eq!(FileId::from_checkpoint_name(b"file/x"), None);
        assert_eq!(FileId::from_checkpoint_name(b"other/1:2"), None);
    }

    #[test]
    fn a_fingerprint_tells_a_new_file_from_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"first line\n").unwrap();
        let file = File::open(&path).unwrap();
        let short = Fingerprint::of(&file).unwrap();
        assert_eq!(short.len, 11);
        assert!(!short.is_full());
        // Growing keeps it matching; other bytes do not.
        let mut w = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        w.write_all(&[b'x'; 400]).unwrap();
        assert!(short.matches(&file).unwrap());
        let full = Fingerprint::of(&file).unwrap();
        assert!(full.is_full());
        std::fs::write(&path, b"other line\n").unwrap();
        assert!(!short.matches(&file).unwrap());
    }
}
