//! Helpers shared by the demo and soak tests.

use serde_json::Value;

/// The strings of a JSON array, sorted (for exact-set assertions).
///
/// # Panics
/// When `v` is not an array (the summary's shape is wrong).
pub fn strings(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    out.sort();
    out
}
