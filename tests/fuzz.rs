//! Fuzzing of the two parsers that read untrusted bytes: the
//! `Idempotency-Key` header and the stored-record decoder. It runs on stable
//! Rust as an ordinary test: each target replays its committed corpus
//! (`tests/fuzz/*.hex`, one input per line), then mutates it for a bounded
//! number of cases from a fixed seed, checking the target's invariants on
//! every input.
//!
//! `FUZZ_CASES` (default 200000 per target) and `FUZZ_SEED` make a longer
//! or another run; `FUZZ_SAVE=1` appends each input whose outcome no
//! earlier input had to the corpus file. `scripts/fuzz` does all three.
//!
//! Every quoted value is also read by the `sfv` crate, whichever reader
//! the crate was built with: both must name the same key or refuse it.

mod common;

use std::{collections::BTreeSet, fs, path::PathBuf};

use common::{key_header, quoted_key};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tower_idempotency::{
    key::{parse_key, KeyError, MAX_KEY_LEN},
    store::StoredResponse,
};

/// A small xorshift generator: the same seed gives the same run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes the parsers treat specially, tried more often than chance would.
const INTERESTING: &[u8] = b"\"\\ \t;=:?*,\x00\x01\x1f\x7f\x80\xff0aZ";

fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(out.len() + 1);
        let byte = if rng.below(2) == 0 {
            INTERESTING[rng.below(INTERESTING.len())]
        } else {
            rng.next() as u8
        };
        match rng.below(7) {
            0 if at < out.len() => out[at] ^= 1 << rng.below(8),
            1 if at < out.len() => out[at] = byte,
            2 => out.insert(at, byte),
            3 if at < out.len() => {
                out.remove(at);
            }
            4 => out.truncate(at),
            5 if at < out.len() => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                let chunk = out[at..end].to_vec();
                out.splice(at..at, chunk);
            }
            6 => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len() + 1);
                out.splice(at.., other[from..].iter().copied());
            }
            _ => out.push(byte),
        }
    }
    out
}

fn corpus_path(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fuzz/{target}.hex"))
}

fn load(target: &str) -> Vec<Vec<u8>> {
    let text = fs::read_to_string(corpus_path(target)).expect("corpus file");
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            assert!(
                line.len() % 2 == 0 && line.bytes().all(|b| b.is_ascii_hexdigit()),
                "{target} corpus: not an even run of hex digits: {line:?}"
            );
            (0..line.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex"))
                .collect()
        })
        .collect()
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| v.parse().expect("a number"))
}

/// Replays the corpus of `target`, then runs `FUZZ_CASES` mutations of it
/// through `check`, which returns a name for the input's outcome.
fn fuzz(target: &str, check: impl Fn(&[u8]) -> String) {
    let mut corpus = load(target);
    assert!(!corpus.is_empty(), "the {target} corpus is empty");
    let mut outcomes: BTreeSet<String> = corpus.iter().map(|input| check(input)).collect();
    let mut rng = Rng(setting("FUZZ_SEED", 0x5eed_1dea_f00d) | 1);
    let save = std::env::var_os("FUZZ_SAVE").is_some();
    for _ in 0..setting("FUZZ_CASES", 200_000) {
        let seed = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, seed, &corpus);
        if outcomes.insert(check(&input)) && save {
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            let mut text = fs::read_to_string(corpus_path(target)).unwrap();
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&hex);
            text.push('\n');
            fs::write(corpus_path(target), text).unwrap();
            corpus.push(input);
        }
    }
}

fn parse(value: &[u8]) -> Result<Option<String>, KeyError> {
    parse_key(&key_header(value).expect("a header value"))
}

/// What any header value must give: a key of 1 to 255 visible ASCII
/// characters that reads the same bare and quoted, or a refusal; and for a
/// quoted value, the key `sfv` reads from it.
fn check_key_header(value: &[u8]) -> String {
    if HeaderValue::from_bytes(value).is_err() {
        return "not a header value".to_owned();
    }
    let quoted_form = value.trim_ascii().starts_with(b"\"");
    let parsed = parse(value);
    if quoted_form {
        let by_sfv = key_by_sfv(value);
        let ours = parsed.clone().ok().flatten();
        assert_eq!(ours, by_sfv, "{:?}", String::from_utf8_lossy(value));
    }
    match parsed {
        Ok(Some(key)) => {
            assert!(
                !key.is_empty() && key.len() <= MAX_KEY_LEN,
                "{value:?} gave {key:?}"
            );
            assert!(
                key.bytes().all(|b| b.is_ascii_graphic()),
                "{value:?} gave {key:?}"
            );
            if !key.starts_with('"') {
                assert_eq!(parse(key.as_bytes()), Ok(Some(key.clone())), "bare {key:?}");
            }
            assert_eq!(
                parse(quoted_key(&key).as_bytes()),
                Ok(Some(key.clone())),
                "quoted {key:?}"
            );
            format!("ok {}", if quoted_form { "quoted" } else { "bare" })
        }
        Ok(None) => unreachable!("the header is present"),
        Err(err) => format!("{err:?}"),
    }
}

/// The key a quoted value names by `sfv`'s reading of RFC 9651 and the
/// key's own rules, whichever reader the crate was built with.
fn key_by_sfv(value: &[u8]) -> Option<String> {
    let trimmed = value.trim_ascii();
    if !trimmed.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return None;
    }
    let item: sfv::Item = sfv::Parser::new(trimmed).parse().ok()?;
    match item.bare_item {
        sfv::BareItem::String(key) if item.params.is_empty() => {
            let key: String = key.into();
            let valid = !key.is_empty()
                && key.len() <= MAX_KEY_LEN
                && key.bytes().all(|b| b.is_ascii_graphic());
            valid.then_some(key)
        }
        _ => None,
    }
}

#[test]
fn the_key_header_parser_keeps_its_invariants() {
    fuzz("key_header", check_key_header);
}

/// Each of these gives the same answer with and without the `sfv` feature
/// (the test runs in both builds).
#[test]
fn both_readers_of_the_quoted_form_agree_on_these() {
    type Expected = Result<Option<&'static str>, KeyError>;
    let cases: &[(&[u8], Expected)] = &[
        (b"abc", Ok(Some("abc"))),
        (b"\"abc\"", Ok(Some("abc"))),
        (b"  \"abc\"\t", Ok(Some("abc"))),
        (b"\"a\\\"b\\\\c\"", Ok(Some("a\"b\\c"))),
        (b"\"a\\b\"", Err(KeyError::MalformedString)),
        (b"\"abc", Err(KeyError::MalformedString)),
        (b"\"abc\";p=1", Err(KeyError::MalformedString)),
        (b"\"abc\" x", Err(KeyError::MalformedString)),
        (b"\"\"", Err(KeyError::Empty)),
        (b"\"a b\"", Err(KeyError::InvalidCharacter)),
        (b"\"a\tb\"", Err(KeyError::InvalidCharacter)),
        (b"\"a\x80\"", Err(KeyError::InvalidCharacter)),
        (b"\"a\"\x80", Err(KeyError::InvalidCharacter)),
        (b"a\"b", Ok(Some("a\"b"))),
        (b"", Err(KeyError::Empty)),
        (b"a b", Err(KeyError::InvalidCharacter)),
    ];
    for (value, expected) in cases {
        let expected = expected.map(|key| key.map(str::to_owned));
        assert_eq!(
            parse(value),
            expected,
            "{:?}",
            String::from_utf8_lossy(value)
        );
    }
    let long = quoted_key(&"k".repeat(MAX_KEY_LEN + 1));
    assert_eq!(parse(long.as_bytes()), Err(KeyError::TooLong));
}

/// What any stored bytes must give: a refusal, or a record that survives
/// another trip through the codec unchanged. (Not the same bytes: a header
/// name is read in any case and written in lower case.)
fn check_record(bytes: &[u8]) -> String {
    match StoredResponse::decode(Bytes::copy_from_slice(bytes)) {
        Ok(record) => {
            assert_eq!(
                StoredResponse::decode(record.encode()).as_ref(),
                Ok(&record)
            );
            let class = if record.trailers.is_some() {
                "trailers"
            } else {
                "plain"
            };
            format!("ok {class} {}", record.headers.len().min(3))
        }
        Err(err) => err.to_string(),
    }
}

#[test]
fn the_record_decoder_keeps_its_invariants() {
    fuzz("record", check_record);
}

#[test]
fn the_record_corpus_starts_from_records_the_codec_writes() {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let record = StoredResponse::new(
        StatusCode::CREATED,
        headers,
        Bytes::from_static(b"{\"id\":1}"),
        Some(trailers),
    );
    let corpus = load("record");
    assert!(corpus.contains(&record.encode().to_vec()));
}

#[test]
fn a_record_naming_more_headers_than_a_map_holds_is_refused() {
    let names = 40_000u32;
    let mut bytes = b"TIR1\x00\xc8".to_vec();
    bytes.extend_from_slice(&names.to_be_bytes());
    for n in 0..names {
        let name = format!("h{n}");
        bytes.extend_from_slice(&(name.len() as u32).to_be_bytes());
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(&1u32.to_be_bytes());
        bytes.push(b'v');
    }
    bytes.push(0);
    bytes.extend_from_slice(&0u64.to_be_bytes());
    assert_eq!(check_record(&bytes), "too many headers");
}
