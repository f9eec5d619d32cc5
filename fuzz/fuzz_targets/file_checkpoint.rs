//! A file source's checkpoint as the queue hands it back (`sources/file/position.rs`): its
//! bytes may be corrupt (bit rot in the queue), and a corrupt one must come back as an error,
//! for the file to be read as one without a checkpoint, never as a panic or a huge allocation.
//! Also the checkpoint's name (`file/DEV:INO`), parsed back to a file.
//!
//! Input: one byte choosing what is read (even: a position, odd: a name), then its bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sekoia_forwarder::sources::file::position::{FileId, Position};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Ok(position) = Position::decode(bytes) {
            let again = Position::decode(&position.encode()).expect("an encoded position decodes");
            assert_eq!(again, position);
        }
    } else if let Some(id) = FileId::from_checkpoint_name(bytes) {
        assert_eq!(FileId::from_checkpoint_name(&id.checkpoint_name()), Some(id));
    }
});
