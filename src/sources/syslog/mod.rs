//! The syslog source: messages over UDP, TCP and TLS, each one an event of the source's
//! intake key, forwarded as sent (the intake parses RFC 3164 and RFC 5424).

pub mod framing;
