//! Chunks, byte for byte: the events of one intake key as one sled value, its 9-byte header,
//! and the v1 body's encodings (bincode; lz4 block; zstd frame), decoded without trusting any
//! length they give (`queue/record/mod.rs` has the layout's tables).

use serde::{Deserialize, Serialize};

use super::{
    config, decode_config, Codec, DecodeError, CHUNK_HEADER_LEN, CHUNK_V2, CHUNK_V3, LZ4_MAX_RATIO,
    LZ4_SLACK, MAX_CHUNK_BODY_BYTES, SIZE_FIELD_LEN, VALUE_V1, ZSTD_LEVEL,
};
/// Events of one intake key, received together, stored as one sled value.
///
/// Storing many events per key is what makes sled fast enough (one key per event is ~10x
/// slower, `shared/notes/measurements.md`). All events of a chunk share the key, the sender's
/// event date (if any) and the reception time, so a chunk maps onto one `/jsons` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub intake_key: String,
    /// `X-SEKOIAIO-EVENT-TIMESTAMP` to send with these events, as the sender gave it.
    pub timestamp: Option<String>,
    /// When the forwarder received these events, milliseconds since the Unix epoch.
    pub received_at_ms: u64,
    pub events: Vec<String>,
}

/// The fixed-size start of a stored chunk: enough to keep counters without decoding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkHeader {
    pub events: u32,
    pub payload_bytes: u32,
}

impl Chunk {
    pub fn payload_bytes(&self) -> usize {
        self.events.iter().map(String::len).sum()
    }

    /// The chunk as a view borrowing its strings: what is encoded.
    pub fn view(&self) -> ChunkView<'_> {
        ChunkView {
            intake_key: &self.intake_key,
            timestamp: self.timestamp.as_deref(),
            received_at_ms: self.received_at_ms,
            events: self.events.iter().map(String::as_str).collect(),
        }
    }

    /// [`ChunkView::encode`].
    pub fn encode(&self, codec: Codec) -> Vec<u8> {
        self.view().encode(codec)
    }

    /// [`ChunkView::encode_keeping_body`].
    pub fn encode_keeping_body(&self, codec: Codec) -> (Vec<u8>, Option<Vec<u8>>) {
        self.view().encode_keeping_body(codec)
    }

    /// [`ChunkView::encode_compressed`].
    pub fn encode_compressed(&self, codec: Codec) -> Vec<u8> {
        self.view().encode_compressed(codec)
    }

    /// [`ChunkView::encode_plain`].
    pub fn encode_plain(&self) -> Vec<u8> {
        self.view().encode_plain()
    }

    /// Decodes a chunk of any version this release knows (v1, v2).
    pub fn decode(bytes: &[u8]) -> Result<Chunk, DecodeError> {
        let mut scratch = Vec::new();
        Ok(ChunkView::decode(bytes, &mut scratch)?.to_chunk())
    }
}

/// Encoding: from a view, so that a source's lines are encoded straight from the bytes it
/// read, with no owned copy of each (the bincode encoding of `&str` is that of `String`, so
/// the bytes are those of the [`Chunk`] with the same contents).
impl ChunkView<'_> {
    /// Encodes the chunk with its header: compressed with `codec` (v2, v3) when that is at
    /// least an eighth smaller than v1, else as v1, so that delivery does not pay to
    /// decompress what did not compress.
    pub fn encode(&self, codec: Codec) -> Vec<u8> {
        self.encode_keeping_body(codec).0
    }

    /// [`ChunkView::encode`], also giving back the v1 body when the value is compressed (what a
    /// reader would decompress it to; `fresh.rs` keeps it for delivery).
    pub fn encode_keeping_body(&self, codec: Codec) -> (Vec<u8>, Option<Vec<u8>>) {
        let body = self.body();
        match self.encode_compressed_body(&body, codec) {
            Some(v) if v.len() - CHUNK_HEADER_LEN <= body.len() - body.len() / 8 => (v, Some(body)),
            _ => (self.encode_v1(&body), None),
        }
    }

    /// Encodes the chunk with its header compressed with `codec`, whatever it saves.
    pub fn encode_compressed(&self, codec: Codec) -> Vec<u8> {
        let body = self.body();
        self.encode_compressed_body(&body, codec)
            .unwrap_or_else(|| self.encode_v1(&body))
    }

    /// The v2 or v3 value of a chunk whose v1 body is `body`; `None` for a body over
    /// [`MAX_CHUNK_BODY_BYTES`] (or a compressor that fails, which v1 then stands in for).
    fn encode_compressed_body(&self, body: &[u8], codec: Codec) -> Option<Vec<u8>> {
        if body.len() > MAX_CHUNK_BODY_BYTES {
            return None;
        }
        let (version, max) = match codec {
            Codec::Lz4 => (
                CHUNK_V2,
                lz4_flex::block::get_maximum_output_size(body.len()),
            ),
            Codec::Zstd => (CHUNK_V3, zstd::zstd_safe::compress_bound(body.len())),
        };
        let mut out = self.header(version, SIZE_FIELD_LEN + max);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        let start = out.len();
        out.resize(start + max, 0);
        let n = match codec {
            Codec::Lz4 => lz4_flex::block::compress_into(body, &mut out[start..]).ok()?,
            Codec::Zstd => zstd_compress(body, &mut out[start..])?,
        };
        out.truncate(start + n);
        Some(out)
    }

    /// Encodes the chunk with its header, as v1 (uncompressed): for chunks that will be read
    /// back at once, where compressing them would only cost CPU. The body is encoded straight
    /// after the header, with no intermediate copy of the events.
    pub fn encode_plain(&self) -> Vec<u8> {
        let mut out = self.header(VALUE_V1, self.body_capacity());
        self.body_into(&mut out);
        out
    }

    /// Encodes the chunk with its header, as v1 (bincode alone).
    pub(super) fn encode_v1(&self, body: &[u8]) -> Vec<u8> {
        let mut out = self.header(VALUE_V1, body.len());
        out.extend_from_slice(body);
        out
    }

    /// A buffer holding the header, with room for `body` more bytes.
    fn header(&self, version: u8, body: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + body);
        out.push(version);
        out.extend_from_slice(&(self.events.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.payload_bytes() as u32).to_le_bytes());
        out
    }

    /// The bincode body (the v1 body, and v2's before compression).
    pub(super) fn body(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.body_capacity());
        self.body_into(&mut body);
        body
    }

    /// Room for the bincode body: the events, their length prefixes, the rest.
    fn body_capacity(&self) -> usize {
        self.payload_bytes() + self.events.len() * 3 + self.intake_key.len() + 64
    }

    /// Appends the bincode body to `out`.
    fn body_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        // Encoding into a Vec cannot fail for these types.
        if bincode::serde::encode_into_std_write(self, out, config()).is_err() {
            out.truncate(start);
        }
    }
}

/// A chunk decoded without copying its events: they borrow the stored bytes (v1) or the
/// decompressed body (v2). Delivery reads chunks this way and writes the events straight
/// into a request body; the bincode encoding of `&str` is that of `String`, so a view reads
/// exactly what [`Chunk`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkView<'a> {
    pub intake_key: &'a str,
    #[serde(borrow)]
    pub timestamp: Option<&'a str>,
    pub received_at_ms: u64,
    #[serde(borrow)]
    pub events: Vec<&'a str>,
}

impl<'a> ChunkView<'a> {
    /// Decodes a chunk of any version this release knows (v1, v2). A v2 body is decompressed
    /// into `scratch`, which callers reuse from one chunk to the next.
    pub fn decode(bytes: &'a [u8], scratch: &'a mut Vec<u8>) -> Result<ChunkView<'a>, DecodeError> {
        let header = ChunkHeader::decode(bytes)?;
        let rest = bytes.get(CHUNK_HEADER_LEN..).unwrap_or_default();
        let body: &'a [u8] = match bytes.first() {
            Some(&CHUNK_V2) => {
                decompress_into(rest, bytes.len(), scratch)?;
                scratch
            }
            Some(&CHUNK_V3) => {
                zstd_decompress_into(rest, bytes.len(), header, scratch)?;
                scratch
            }
            _ => rest,
        };
        Ok(bincode::serde::borrow_decode_from_slice(body, decode_config())?.0)
    }

    /// Decodes a chunk from its v1 `body` given apart from its stored value (kept by
    /// `fresh.rs` when the value was compressed); `None` unless the body holds what the stored
    /// `header` says, so that a reader falls back to the stored value.
    pub fn from_body(header: ChunkHeader, body: &'a [u8]) -> Option<ChunkView<'a>> {
        let view: ChunkView<'a> = bincode::serde::borrow_decode_from_slice(body, decode_config())
            .ok()?
            .0;
        let matches = view.events.len() == header.events as usize
            && view.payload_bytes() == header.payload_bytes as usize;
        matches.then_some(view)
    }

    /// Payload bytes: the events' lengths.
    pub fn payload_bytes(&self) -> usize {
        self.events.iter().map(|e| e.len()).sum()
    }

    /// An owned copy.
    pub fn to_chunk(&self) -> Chunk {
        Chunk {
            intake_key: self.intake_key.to_owned(),
            timestamp: self.timestamp.map(str::to_owned),
            received_at_ms: self.received_at_ms,
            events: self.events.iter().map(|e| (*e).to_owned()).collect(),
        }
    }
}

/// Whether a stored chunk is compressed (v2, v3): reading it costs a decompression.
pub fn is_compressed(bytes: &[u8]) -> bool {
    matches!(bytes.first(), Some(&CHUNK_V2 | &CHUNK_V3))
}

/// The most readable form of a stored chunk that cannot be decoded, for the dead letter that
/// keeps it: a v2 value whose lz4 block is intact is given decompressed (its events are then
/// legible in it); anything else is given as stored.
pub fn salvage(bytes: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    let rest = bytes.get(CHUNK_HEADER_LEN..).unwrap_or_default();
    let decompressed = match (bytes.first(), ChunkHeader::decode(bytes)) {
        (Some(&CHUNK_V2), _) => decompress_into(rest, bytes.len(), &mut body).is_ok(),
        (Some(&CHUNK_V3), Ok(header)) => {
            zstd_decompress_into(rest, bytes.len(), header, &mut body).is_ok()
        }
        _ => false,
    };
    if decompressed {
        body
    } else {
        bytes.to_vec()
    }
}

thread_local! {
    /// zstd contexts, kept from one chunk to the next (making one costs more than compressing
    /// a small chunk): senders' tasks compress, delivery decompresses, on the runtime's threads.
    static ZSTD_COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static ZSTD_DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Compresses `body` into `out` (at least `compress_bound` long); `None` if zstd fails.
fn zstd_compress(body: &[u8], out: &mut [u8]) -> Option<usize> {
    ZSTD_COMPRESSOR.with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?);
        }
        c.as_mut()?.compress_to_buffer(body, out).ok()
    })
}

/// The largest v1 body a chunk with this header can have: its events, a length prefix of at
/// most 9 bytes each, and room for the key, the date and the rest (sources let through keys of
/// 256 bytes and dates of 64; the queue itself does not check, hence the wide room). Bounds
/// what a corrupt size field can make the decoder allocate (zstd, unlike lz4, has no useful
/// ratio bound).
fn max_body_len(header: ChunkHeader) -> usize {
    const ROOM: usize = 1 << 20;
    (header.payload_bytes as usize)
        .saturating_add((header.events as usize).saturating_mul(9))
        .saturating_add(ROOM)
        .min(MAX_CHUNK_BODY_BYTES)
}

/// Decompresses the body of a v3 chunk into `body` (`rest`: what follows the header;
/// `value_len`: the whole value's length, for errors).
fn zstd_decompress_into(
    rest: &[u8],
    value_len: usize,
    header: ChunkHeader,
    body: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    let Some((size, frame)) = rest.split_first_chunk::<SIZE_FIELD_LEN>() else {
        return Err(DecodeError::Truncated(value_len));
    };
    let claimed = u32::from_le_bytes(*size) as usize;
    let limit = max_body_len(header);
    if claimed > limit {
        return Err(DecodeError::BodySize { claimed, limit });
    }
    // The frame says its size too (this release always writes it): both must agree before
    // anything is allocated, so that one corrupt field is not enough to ask for `limit`.
    let declared = zstd::zstd_safe::get_frame_content_size(frame)
        .ok()
        .flatten()
        .and_then(|n| usize::try_from(n).ok());
    if declared != Some(claimed) {
        return Err(DecodeError::ZstdLength {
            claimed,
            actual: declared.unwrap_or(0),
        });
    }
    body.clear();
    body.reserve_exact(claimed);
    let actual = ZSTD_DECOMPRESSOR.with(|d| {
        let mut d = d
            .try_borrow_mut()
            .map_err(|_| std::io::Error::other("zstd decompressor busy"))?;
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        match d.as_mut() {
            Some(d) => d.decompress_to_buffer(frame, body),
            None => Err(std::io::Error::other("no zstd decompressor")),
        }
    });
    let actual = actual.map_err(DecodeError::Zstd)?;
    if actual != claimed {
        return Err(DecodeError::ZstdLength { claimed, actual });
    }
    Ok(())
}

/// Decompresses the body of a v2 chunk into `body` (`rest`: what follows the header;
/// `value_len`: the whole value's length, for errors), never allocating more than its block
/// can decompress to.
fn decompress_into(rest: &[u8], value_len: usize, body: &mut Vec<u8>) -> Result<(), DecodeError> {
    let Some((size, block)) = rest.split_first_chunk::<SIZE_FIELD_LEN>() else {
        return Err(DecodeError::Truncated(value_len));
    };
    let claimed = u32::from_le_bytes(*size) as usize;
    let limit = block
        .len()
        .saturating_mul(LZ4_MAX_RATIO)
        .saturating_add(LZ4_SLACK)
        .min(MAX_CHUNK_BODY_BYTES);
    if claimed > limit {
        return Err(DecodeError::CompressedSize {
            claimed,
            compressed: block.len(),
            limit,
        });
    }
    body.clear();
    body.resize(claimed, 0);
    let actual = lz4_flex::block::decompress_into(block, body)?;
    if actual != claimed {
        return Err(DecodeError::Lz4Length { claimed, actual });
    }
    Ok(())
}

impl ChunkHeader {
    /// Reads the header of a chunk of any version this release knows (v1, v2).
    pub fn decode(bytes: &[u8]) -> Result<ChunkHeader, DecodeError> {
        let Some((header, _)) = bytes.split_first_chunk::<CHUNK_HEADER_LEN>() else {
            return Err(DecodeError::Truncated(bytes.len()));
        };
        let [version, e0, e1, e2, e3, p0, p1, p2, p3] = *header;
        if version != VALUE_V1 && version != CHUNK_V2 && version != CHUNK_V3 {
            return Err(DecodeError::UnknownVersion(version));
        }
        Ok(ChunkHeader {
            events: u32::from_le_bytes([e0, e1, e2, e3]),
            payload_bytes: u32::from_le_bytes([p0, p1, p2, p3]),
        })
    }
}
