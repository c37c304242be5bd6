//! Plain aligned tables and human times for the list commands (`devices`,
//! `bundles`, `rollouts`); their `--json` prints the API's JSON instead.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest cell shown, in characters; longer ones end in `…`.
pub const MAX_CELL: usize = 80;

/// `cell` cut to [`MAX_CELL`] characters, control characters shown as `?`.
fn clean(cell: &str) -> String {
    let mut out: String = cell
        .chars()
        .take(MAX_CELL)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if cell.chars().count() > MAX_CELL {
        out.pop();
        out.push('…');
    }
    out
}

/// Rows under a header, each column padded to its widest cell, two spaces
/// between columns, no trailing blanks; one line per row, newline-terminated.
/// Cells are cut to [`MAX_CELL`] characters.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(&widths) {
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Milliseconds since the Unix epoch now (the server's timestamps are in these).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How long before `now_ms` the time `then_ms` was, for people: `12s ago`,
/// `3m 12s ago`, `2h 5m ago`, `4days 1h ago` (humantime, rounded to the two
/// largest units); `-` for 0 (never), `just now` within a second or in the future.
pub fn ago(now_ms: u64, then_ms: u64) -> String {
    if then_ms == 0 {
        return "-".into();
    }
    let s = now_ms.saturating_sub(then_ms) / 1000;
    if s == 0 {
        return "just now".into();
    }
    let unit = match s {
        0..3600 => 1,
        3600..86_400 => 60,
        _ => 3600,
    };
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(s / unit * unit))
    )
}

/// A byte count for people: `512 B`, `1.5 KiB`, `30.2 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    #[allow(clippy::cast_precision_loss)] // display only
    let mut v = n as f64 / 1024.0;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", UNITS[i])
}

/// The strings of a JSON array joined with `,` (`-` when empty or absent).
pub fn list(v: &serde_json::Value) -> String {
    let items: Vec<&str> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str())
        .collect();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let t = render(
            &["id", "state"],
            &[
                vec!["a".into(), "running".into()],
                vec!["longer-id".into(), "x".into()],
            ],
        );
        assert_eq!(t, "id         state\na          running\nlonger-id  x\n");
    }

    /// A cell of 100,000 characters (a group name once accepted by the
    /// server) is cut, not a panic; control characters do not reach the
    /// terminal.
    #[test]
    fn huge_and_control_cells_are_cut() {
        let t = render(
            &["g"],
            &[vec!["a".repeat(100_000)], vec!["x\ny\u{1b}".into()]],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1].chars().count(), MAX_CELL);
        assert!(lines[1].ends_with('…'));
        assert_eq!(lines[2], "x?y?");
    }

    #[test]
    fn ages_read_like_a_person_would_say_them() {
        let now = 1_700_000_000_000;
        assert_eq!(ago(now, 0), "-");
        assert_eq!(ago(now, now + 5_000), "just now");
        assert_eq!(ago(now, now - 12_400), "12s ago");
        assert_eq!(ago(now, now - 192_000), "3m 12s ago");
        assert_eq!(ago(now, now - (2 * 3600 + 5 * 60 + 7) * 1000), "2h 5m ago");
        assert_eq!(
            ago(now, now - (4 * 86_400 + 3600 + 9) * 1000),
            "4days 1h ago"
        );
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(30 * 1024 * 1024 + 200 * 1024), "30.2 MiB");
    }
}
