//! A transition as a table for people: one row per service, then the totals and what was left out.

use std::fmt::Write as _;

use super::catalog::DeltaStatus;
use super::transition::{short_digest, ImageInfo, Transition};

const HEADERS: [&str; 6] = ["SERVICE", "CHANGE", "STATUS", "IMAGE", "PAYLOAD", "REASON"];
/// Spaces between columns.
const GAP: usize = 2;

/// Renders the transition as a plain-text table (no colours, no trailing spaces), ending with a
/// newline.
pub fn render_table(t: &Transition) -> String {
    let rows: Vec<[String; 6]> = t
        .services
        .iter()
        .map(|s| {
            [
                s.service_name.clone(),
                s.change.to_string(),
                s.status.to_string(),
                format!("{} -> {}", side(s.from_image.as_ref()), side(s.to_image.as_ref())),
                human_size(s.payload_size),
                s.reason.clone(),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let _ = writeln!(out, "release {} -> {}", release_name(&t.from.id, t.from.commit.as_deref()), release_name(&t.to.id, t.to.commit.as_deref()));
    push_row(&mut out, &HEADERS.map(str::to_string), &widths);
    for row in &rows {
        push_row(&mut out, row, &widths);
    }
    let ready = t.deltas.iter().filter(|d| matches!(d.status, DeltaStatus::Ready { .. })).count();
    let building = t.deltas.iter().filter(|d| d.status == DeltaStatus::Building).count();
    let _ = writeln!(
        out,
        "overall: {}; estimated payload: {}; deltas: {} needed ({ready} ready, {building} being built, {} to build)",
        t.overall_status,
        human_size(t.estimated_total_payload_size),
        t.deltas.len(),
        t.deltas_to_build().count()
    );
    if !t.contracts_checked {
        out.push_str("contracts: not checked (no device facts given)\n");
    }
    for dropped in &t.dropped {
        let unmet: Vec<String> = dropped.unmet.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "dropped: {} (optional; contract {}): {}", dropped.service_name, dropped.contract, unmet.join("; "));
    }
    out
}

fn push_row(out: &mut String, cells: &[String; 6], widths: &[usize; 6]) {
    let mut line = String::new();
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        line.push_str(cell);
        if i + 1 < cells.len() {
            line.extend(std::iter::repeat_n(' ', width - cell.chars().count() + GAP));
        }
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

fn side(image: Option<&ImageInfo>) -> String {
    image.map_or_else(|| "-".to_string(), |i| short_digest(&i.digest))
}

fn release_name(id: &str, commit: Option<&str>) -> String {
    match commit {
        Some(commit) => format!("{id} ({})", commit.chars().take(SHORT_COMMIT).collect::<String>()),
        None => id.to_string(),
    }
}

/// Characters of a commit shown, as git abbreviates them.
const SHORT_COMMIT: usize = 7;

/// Bytes in binary units with one decimal (`0 B`, `512 B`, `1.5 KiB`, `2.0 MiB`).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_human() {
        for (bytes, text) in [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (5 << 20, "5.0 MiB"), (3 << 30, "3.0 GiB")] {
            assert_eq!(human_size(bytes), text);
        }
    }
}
