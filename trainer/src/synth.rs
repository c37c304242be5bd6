//! Deterministic data generators with exact labels: rendered text lines
//! ([`text`], task `text_direction`) and espeak-ng speech in noise ([`vad`], task `vad`).
//! The same seed gives the same bytes on every machine and thread count.

pub mod text;
pub mod vad;

use rand::{Rng, SeedableRng};

/// A stream-independent RNG for item `index` of a generator run with `seed` (so items can be
/// made in parallel in any order).
pub(crate) fn item_rng(seed: u64, stream: u64, index: u64) -> rand::rngs::StdRng {
    let mut s = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    s = s.wrapping_add(index.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    s ^= s >> 31;
    rand::rngs::StdRng::seed_from_u64(s)
}

/// A standard normal sample (Box-Muller).
pub(crate) fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.gen_range(1e-12..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Runs `f(i)` for `i in 0..n` on the available cores; results in index order.
pub(crate) fn par_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |p| p.get())
        .clamp(1, 8)
        .min(n.max(1));
    let chunk = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || {
                    (t * chunk..((t + 1) * chunk).min(n))
                        .map(f)
                        .collect::<Vec<T>>()
                })
            })
            .collect();
        handles
            .into_iter()
            // A worker's panic is a generator bug: re-raise it rather than return fewer items.
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// Words both generators draw their text from (upper case: the 5x7 font has A-Z and 0-9).
pub(crate) const WORDS: &[&str] = &[
    "THE",
    "OF",
    "AND",
    "TO",
    "IN",
    "IS",
    "YOU",
    "THAT",
    "IT",
    "HE",
    "WAS",
    "FOR",
    "ON",
    "ARE",
    "AS",
    "WITH",
    "HIS",
    "THEY",
    "AT",
    "BE",
    "THIS",
    "HAVE",
    "FROM",
    "OR",
    "ONE",
    "HAD",
    "BY",
    "WORD",
    "BUT",
    "NOT",
    "WHAT",
    "ALL",
    "WERE",
    "WE",
    "WHEN",
    "YOUR",
    "CAN",
    "SAID",
    "THERE",
    "USE",
    "EACH",
    "WHICH",
    "SHE",
    "DO",
    "HOW",
    "THEIR",
    "IF",
    "WILL",
    "UP",
    "OTHER",
    "ABOUT",
    "OUT",
    "MANY",
    "THEN",
    "THEM",
    "THESE",
    "SO",
    "SOME",
    "HER",
    "WOULD",
    "MAKE",
    "LIKE",
    "HIM",
    "INTO",
    "TIME",
    "HAS",
    "LOOK",
    "TWO",
    "MORE",
    "WRITE",
    "GO",
    "SEE",
    "NUMBER",
    "NO",
    "WAY",
    "COULD",
    "PEOPLE",
    "MY",
    "THAN",
    "FIRST",
    "WATER",
    "BEEN",
    "CALL",
    "WHO",
    "OIL",
    "NOW",
    "FIND",
    "LONG",
    "DOWN",
    "DAY",
    "DID",
    "GET",
    "COME",
    "MADE",
    "MAY",
    "PART",
    "INVOICE",
    "TOTAL",
    "DUE",
    "EUR",
    "PAYMENT",
    "WITHIN",
    "DAYS",
    "ORDER",
    "SHIP",
    "WAREHOUSE",
    "DOCK",
    "QUANTITY",
    "UNIT",
    "PRICE",
    "REFERENCE",
    "QUALITY",
    "CHECKED",
    "STATION",
    "PLATFORM",
    "TRAIN",
    "DEPARTS",
    "MINUTES",
    "SENSOR",
    "VALVE",
    "PRESSURE",
    "TEMPERATURE",
    "BATTERY",
    "SERIAL",
    "MODEL",
    "VERSION",
    "DATE",
    "NAME",
    "ADDRESS",
    "STREET",
    "CITY",
    "PHONE",
];

/// `k` random words, some replaced by numbers or codes.
pub(crate) fn random_text(rng: &mut impl Rng, k: usize) -> String {
    let mut out = Vec::with_capacity(k);
    for _ in 0..k {
        let w = match rng.gen_range(0..10) {
            0 => rng.gen_range(0..100_000u32).to_string(),
            1 => {
                let a = (b'A' + rng.gen_range(0..26u8)) as char;
                format!("{a}{}", rng.gen_range(0..1000u32))
            }
            _ => WORDS[rng.gen_range(0..WORDS.len())].to_string(),
        };
        out.push(w);
    }
    out.join(" ")
}
