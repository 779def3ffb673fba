//! `udmsetup export list` (udm-only), in the column style of `dmsetup info -c`.

use super::report::{render, Column, ReportStyle};
use udm_proto::ExportRecord;

/// The export table with traffic counters.
pub fn export_list(exports: &[ExportRecord], style: &ReportStyle) -> String {
    if exports.is_empty() {
        return "No exports found\n".into();
    }
    let cols = [
        Column::str("Id", 8),
        Column::str("Device", 8),
        Column::str("Kind", 4),
        Column::str("Mode", 4),
        Column::num("Clients", 7),
        Column::num("Requests", 8),
        Column::num("Errors", 6),
        Column::num("Read", 4),
        Column::num("Written", 7),
        Column::str("Location", 8),
    ];
    let rows: Vec<Vec<String>> = exports
        .iter()
        .map(|e| {
            vec![
                e.id.clone(),
                e.device.clone(),
                e.kind.clone(),
                if e.read_only { "ro" } else { "rw" }.into(),
                e.clients.to_string(),
                e.requests.to_string(),
                e.errors.to_string(),
                e.bytes_read.to_string(),
                e.bytes_written.to_string(),
                match &e.unavailable {
                    Some(r) => format!("{} [unavailable: {r}]", e.location),
                    None => e.location.clone(),
                },
            ]
        })
        .collect();
    render(&cols, &rows, style)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_rows() {
        let e = ExportRecord {
            id: "nbd:o".into(),
            device: "o".into(),
            kind: "nbd".into(),
            location: "nbd+unix:///o?socket=/run/udm/nbd.sock".into(),
            read_only: true,
            clients: 1,
            requests: 10,
            errors: 0,
            bytes_read: 4096,
            bytes_written: 0,
            unavailable: None,
        };
        assert_eq!(
            export_list(&[e], &ReportStyle::noheadings()),
            "nbd:o:o:nbd:ro:1:10:0:4096:0:nbd+unix:///o?socket=/run/udm/nbd.sock\n"
        );
        assert_eq!(
            export_list(&[], &ReportStyle::default()),
            "No exports found\n"
        );
    }
}
