//! Mock intake (being written).
