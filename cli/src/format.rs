//! Plain text for people: durations, aligned tables, a progress bar, text made safe for a
//! terminal; and the duration syntax the commands accept.

/// The longest duration an argument may give: a hundred years. Longer is a typo, and past
/// Postgres' timestamps it would fail in the database as "timestamp out of range".
const MAX_DURATION_SECONDS: f64 = 100.0 * 365.25 * 86_400.0;

/// A duration as an operator reads it: `850ms`, `12.3s`, `5m03s`, `2h10m`, `3d04h`; `-` when absent.
pub fn duration(seconds: Option<f64>) -> String {
    let Some(seconds) = seconds else { return "-".into() };
    if seconds < 1.0 {
        return format!("{}ms", (seconds * 1000.0).round() as i64);
    }
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    let whole = seconds.round() as i64;
    let (days, hours, minutes, secs) = (whole / 86_400, whole / 3600 % 24, whole / 60 % 60, whole % 60);
    if days > 0 {
        format!("{days}d{hours:02}h")
    } else if hours > 0 {
        format!("{hours}h{minutes:02}m")
    } else {
        format!("{minutes}m{secs:02}s")
    }
}

/// Parses `30s`, `15m`, `12h`, `7d`, `2w` (or `7 days`, `90 seconds`) into seconds.
pub fn parse_duration(text: &str) -> Result<f64, String> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let bad = || format!("invalid duration {text:?}: expected a number and a unit, like 90s, 30m, 12h or 7d");
    let number: f64 = number.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
        "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
        "h" | "hour" | "hours" => 3600.0,
        "d" | "day" | "days" => 86_400.0,
        "w" | "week" | "weeks" => 604_800.0,
        _ => return Err(bad()),
    };
    Ok(number * scale)
}

/// `seconds`, parsed from `text` given to `flag`, when it is at most a hundred years.
pub fn duration_within_limit(flag: &str, text: &str, seconds: f64) -> Result<f64, String> {
    if seconds <= MAX_DURATION_SECONDS {
        Ok(seconds)
    } else {
        Err(format!("{flag} {text:?} is too long: at most 100 years"))
    }
}

/// Columns whose values line up on the right (counts) or the left (everything else).
pub struct Table {
    headers: Vec<&'static str>,
    numeric: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `columns` are (header, is numeric).
    pub fn new(columns: &[(&'static str, bool)]) -> Table {
        Table { headers: columns.iter().map(|c| c.0).collect(), numeric: columns.iter().map(|c| c.1).collect(), rows: Vec::new() }
    }

    /// Adds a row, its cells made printable: they hold text stored by others.
    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.headers.len());
        self.rows.push(row.iter().map(|cell| printable(cell)).collect());
    }

    pub fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.headers.len())
            .map(|i| self.rows.iter().map(|r| r[i].chars().count()).chain([self.headers[i].len()]).max().unwrap_or(0))
            .collect();
        let line = |cells: Vec<&str>| {
            let padded: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    if self.numeric[i] {
                        format!("{cell:>width$}", width = widths[i])
                    } else {
                        format!("{cell:<width$}", width = widths[i])
                    }
                })
                .collect();
            padded.join("  ").trim_end().to_string() + "\n"
        };
        let mut out = line(self.headers.clone());
        for row in &self.rows {
            out.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        out
    }
}

/// `[#########...........]  4200/10000  42%`
pub fn progress(done: usize, total: usize) -> String {
    const WIDTH: usize = 30;
    let fraction = if total == 0 { 1.0 } else { done as f64 / total as f64 };
    let filled = (fraction * WIDTH as f64).round() as usize;
    format!("[{}{}] {done}/{total} {:>3}%", "#".repeat(filled), ".".repeat(WIDTH - filled), (fraction * 100.0).floor() as u32)
}

/// `text` safe to show on a terminal: the control characters (C0 with ESC, DEL, C1) that text
/// stored by consumers and sinks could use to move the cursor, retitle the window or rewrite
/// what is shown are printed escaped, as `\u{1b}`.
pub fn printable(text: &str) -> String {
    escape_controls(text, false)
}

/// As `printable`, but keeping line breaks, for a field shown on lines of its own.
pub fn printable_lines(text: &str) -> String {
    escape_controls(text, true)
}

fn escape_controls(text: &str, keep_line_breaks: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && !(keep_line_breaks && c == '\n') {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// Cuts `text` to `max` characters on one line, marking the cut, printable.
pub fn clip(text: &str, max: usize) -> String {
    let one_line = printable(&text.replace(['\n', '\r', '\t'], " "));
    if one_line.chars().count() <= max {
        one_line
    } else {
        one_line.chars().take(max.saturating_sub(1)).collect::<String>() + "…"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration(None), "-");
        assert_eq!(duration(Some(0.0042)), "4ms");
        assert_eq!(duration(Some(12.34)), "12.3s");
        assert_eq!(duration(Some(303.0)), "5m03s");
        assert_eq!(duration(Some(7800.0)), "2h10m");
        assert_eq!(duration(Some(3.0 * 86_400.0 + 4.0 * 3600.0)), "3d04h");
    }

    #[test]
    fn duration_arguments() {
        assert_eq!(parse_duration("90s"), Ok(90.0));
        assert_eq!(parse_duration("30m"), Ok(1800.0));
        assert_eq!(parse_duration("1.5h"), Ok(5400.0));
        assert_eq!(parse_duration("7 days"), Ok(604_800.0));
        assert_eq!(parse_duration("2w"), Ok(1_209_600.0));
        for bad in ["", "7", "d", "7 fortnights", "-1d", "1e3s"] {
            let error = parse_duration(bad).unwrap_err();
            assert!(error.contains("invalid duration") && error.contains("like 90s"), "{bad}: {error}");
        }
    }

    #[test]
    fn durations_are_at_most_a_hundred_years() {
        assert_eq!(duration_within_limit("--since", "36500d", 36_500.0 * 86_400.0), Ok(36_500.0 * 86_400.0));
        let huge = "99999999999999999999999d";
        let error = duration_within_limit("--older-than", huge, parse_duration(huge).unwrap()).unwrap_err();
        assert_eq!(error, format!("--older-than {huge:?} is too long: at most 100 years"));
    }

    #[test]
    fn tables_align_counts_right_and_text_left() {
        let mut table = Table::new(&[("NAME", false), ("COUNT", true)]);
        table.push(vec!["default".into(), "7".into()]);
        table.push(vec!["search".into(), "1234".into()]);
        assert_eq!(table.render(), "NAME     COUNT\ndefault      7\nsearch    1234\n");
    }

    #[test]
    fn progress_bar() {
        assert_eq!(progress(0, 10), "[..............................] 0/10   0%");
        assert_eq!(progress(5, 10), "[###############...............] 5/10  50%");
        assert_eq!(progress(10, 10), "[##############################] 10/10 100%");
    }

    #[test]
    fn clipping_keeps_one_line() {
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("line one\nline two", 10), "line one …");
        assert_eq!(clip("a\tb\x1b[2Jc", 40), "a b\\u{1b}[2Jc");
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        let hostile = "ok\x1b]0;pwned\x07\x1b[2J\x7f\u{9b}31m\r\nnext";
        assert_eq!(printable(hostile), "ok\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{7f}\\u{9b}31m\\u{d}\\u{a}next");
        assert_eq!(printable_lines(hostile), "ok\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{7f}\\u{9b}31m\\u{d}\nnext");
        assert_eq!(printable("naïve — 名前"), "naïve — 名前");
        let mut table = Table::new(&[("NAME", false)]);
        table.push(vec!["a\x1b[31mb".into()]);
        assert_eq!(table.render(), "NAME\na\\u{1b}[31mb\n");
    }
}
