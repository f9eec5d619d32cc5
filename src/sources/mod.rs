//! Sources: where events come from. Each one appends to the queue and answers its sender only
//! once the queue says the events are durable.

pub mod http;
pub mod server;
