//! `udmsetup disk list` (udm-only): one row per disk and partition, in the column style of
//! `dmsetup info -c` so it reads like the rest of the tool.

use super::report::{render, Column, ReportStyle};
use udm_proto::DiskRecord;

/// The disk table. Partitions follow their disk, with the disk's path column showing `partN
/// of DISK @start`.
pub fn disk_list(disks: &[DiskRecord], style: &ReportStyle) -> String {
    if disks.is_empty() {
        return "No disks found\n".into();
    }
    let cols = [
        Column::str("Name", 8),
        Column::str("DevNo", 5),
        Column::num("Sectors", 7),
        Column::str("Mode", 4),
        Column::str("Holders", 7),
        Column::str("Path", 4),
    ];
    let mut rows = Vec::new();
    for d in disks {
        let mode = format!(
            "{}{}",
            if d.read_only { "ro" } else { "rw" },
            if d.direct { ",direct" } else { "" }
        );
        rows.push(vec![
            d.name.clone(),
            d.dev.clone(),
            d.sectors.to_string(),
            mode.clone(),
            if d.holders.is_empty() {
                "-".into()
            } else {
                d.holders.join(",")
            },
            path_column(d),
        ]);
        for p in &d.partitions {
            rows.push(vec![
                p.name.clone(),
                p.dev.clone(),
                p.sectors.to_string(),
                mode.clone(),
                "-".into(),
                format!("part{} of {} @{}", p.number, d.name, p.start),
            ]);
        }
    }
    render(&cols, &rows, style)
}

/// The backing path, marked `[implicit]` (opened for a table naming it) and
/// `[unavailable: REASON]` (it could not be opened; its tables and exports wait for it).
fn path_column(d: &DiskRecord) -> String {
    let mut s = d
        .path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(memory)".into());
    if d.implicit {
        s.push_str(" [implicit]");
    }
    if let Some(r) = &d.unavailable {
        s.push_str(&format!(" [unavailable: {r}]"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use udm_proto::PartitionRecord;

    #[test]
    fn disks_and_partitions() {
        let d = DiskRecord {
            name: "vda".into(),
            dev: "254:0".into(),
            path: Some("/img/a.raw".into()),
            sectors: 2048,
            read_only: false,
            direct: true,
            partitions: vec![PartitionRecord {
                name: "vda1".into(),
                dev: "254:1".into(),
                number: 1,
                start: 2048,
                sectors: 1024,
            }],
            holders: vec!["o".into()],
            unavailable: None,
            implicit: false,
        };
        assert_eq!(
            disk_list(&[d], &ReportStyle::default()),
            "Name     DevNo Sectors Mode      Holders Path              \n\
             vda      254:0    2048 rw,direct o       /img/a.raw        \n\
             vda1     254:1    1024 rw,direct -       part1 of vda @2048\n"
        );
        assert_eq!(disk_list(&[], &ReportStyle::default()), "No disks found\n");
        let gone = DiskRecord {
            name: "d0".into(),
            dev: "8:0".into(),
            path: Some("/srv/d0.img".into()),
            sectors: 0,
            read_only: false,
            direct: false,
            partitions: vec![],
            holders: vec![],
            unavailable: Some("/srv/d0.img: no such file".into()),
            implicit: true,
        };
        assert_eq!(
            disk_list(&[gone], &ReportStyle::noheadings()),
            "d0:8:0:0:rw:-:/srv/d0.img [implicit] [unavailable: /srv/d0.img: no such file]\n"
        );
    }
}
