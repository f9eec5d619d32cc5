//! Local intake-compatible HTTP source (being written).
