//! `info`: the long form (lvm2 `libdm/dm-tools/dmsetup.c` `_display_info_long`) and the column
//! form `info -c` (`_report_fields`, `_default_report_options`, `_dm_info_status_disp`).

use super::report::{render, Column, ReportStyle};
use udm_proto::InfoRecord;

/// dmsetup prints the device's read-ahead (BLKRAGET, sectors); udm devices report the kernel
/// default of 256 sectors.
pub const READ_AHEAD: u32 = 256;

/// Error text when the device is missing (dmsetup.c `_display_info`: "Device does not exist.").
pub const NO_DEVICE: &str = "Device does not exist.";

/// The long form of one device, ending with the blank line dmsetup prints after each device.
///
/// Lines and spacing follow `_display_info_long` exactly; the udm-only lines (`Interposer:`,
/// `Redirected:`) appear only for devices whose live table was loaded with `--interpose`, after
/// `Number of targets:`, so dmsetup-parsing scripts see the usual lines in the usual order.
pub fn info_long(i: &InfoRecord) -> String {
    let mut s = String::new();
    s.push_str(&format!("Name:              {}\n", i.name));
    s.push_str(&format!(
        "State:             {}{}{}\n",
        if i.suspended { "SUSPENDED" } else { "ACTIVE" },
        if i.read_only { " (READ-ONLY)" } else { "" },
        if i.deferred_remove {
            " (DEFERRED REMOVE)"
        } else {
            ""
        }
    ));
    // dmsetup reads the read-ahead from the block device; without one (no table ever loaded)
    // the line is left out (and `open failed` goes to stderr, see [`no_block_device`]).
    if !i.no_block_device {
        s.push_str(&format!("Read Ahead:        {READ_AHEAD}\n"));
    }
    if !i.live_present && !i.inactive_present {
        s.push_str("Tables present:    None\n");
    } else {
        s.push_str(&format!(
            "Tables present:    {}{}{}\n",
            if i.live_present { "LIVE" } else { "" },
            if i.live_present && i.inactive_present {
                " & "
            } else {
                ""
            },
            if i.inactive_present { "INACTIVE" } else { "" }
        ));
    }
    if i.open_count != -1 {
        s.push_str(&format!("Open count:        {}\n", i.open_count));
    }
    s.push_str(&format!("Event number:      {}\n", i.event_nr));
    s.push_str(&format!("Major, minor:      {}, {}\n", i.major, i.minor));
    // dmsetup omits the line when target_count is -1; the protocol's count is unsigned.
    s.push_str(&format!("Number of targets: {}\n", i.target_count));
    if i.interposed || !i.interposers.is_empty() {
        for ip in &i.interposers {
            s.push_str(&format!(
                "Interposer:        {} {}+{} {}\n",
                ip.device,
                ip.start,
                ip.len,
                if ip.attached { "attached" } else { "detached" }
            ));
        }
        s.push_str(&format!("Redirected:        {}\n", i.redirected));
    }
    if let Some(r) = &i.unavailable {
        s.push_str(&format!("Unavailable:       {r}\n"));
    }
    if let Some(u) = i.uuid.as_deref().filter(|u| !u.is_empty()) {
        s.push_str(&format!("UUID: {u}\n"));
    }
    s.push('\n');
    s
}

/// dmsetup's complaint on stderr when it opens a device that has no block device yet (no table
/// was ever loaded) to read its read-ahead.
pub fn no_block_device(i: &InfoRecord) -> String {
    format!(
        "/dev/mapper/{}: open failed: No such device or address\n",
        i.name
    )
}

/// dmsetup's complaint when `-o blkdevname` meets a device without a block device; the row is
/// left out and the command fails.
pub fn no_blkdevname(i: &InfoRecord) -> String {
    format!(
        "Could not resolve block device name for {}:{}.\n\
         _do_report_object: report function failed for field blkdevname\n",
        i.major, i.minor
    )
}

/// `attr` (heading `Stat`): live `L`, inactive `I`, suspended `s`, read-only `r` / writable `w`
/// (dmsetup.c `_dm_info_status_disp`).
pub fn attr(i: &InfoRecord) -> String {
    let mut s = String::with_capacity(4);
    s.push(if i.live_present { 'L' } else { '-' });
    s.push(if i.inactive_present { 'I' } else { '-' });
    s.push(if i.suspended { 's' } else { '-' });
    s.push(if i.read_only { 'r' } else { 'w' });
    s
}

/// dmsetup's default `info -c` fields.
pub const DEFAULT_FIELDS: &str = "name,major,minor,attr,open,segments,events,uuid";

/// A field of `info -c -o`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    /// `name` (Name, 16).
    Name,
    /// `uuid` (UUID, 32).
    Uuid,
    /// `read_ahead` (RAhead, 6).
    ReadAhead,
    /// `blkdevname` (BlkDevName, 16).
    BlkDevName,
    /// `attr` (Stat, 4).
    Attr,
    /// `tables_loaded` (Tables, 6).
    TablesLoaded,
    /// `suspended` (Suspended, 9).
    Suspended,
    /// `readonly` (Read-only, 9).
    ReadOnly,
    /// `devno` (DevNo, 5).
    DevNo,
    /// `major` (Maj, 3).
    Major,
    /// `minor` (Min, 3).
    Minor,
    /// `open` (Open, 4).
    Open,
    /// `segments` (Targ, 4).
    Segments,
    /// `events` (Event, 6).
    Events,
    /// udm: `interposed` (Interposes, 10): `dev start+len` of each interposer.
    Interposes,
    /// udm: `redirected` (Redirected, 10): requests redirected into the device.
    Redirected,
    /// udm: `unavailable` (Unavailable, 11): why recorded tables are not rebuilt, or empty.
    Unavailable,
}

impl Field {
    fn parse(s: &str) -> Option<Field> {
        Some(match s {
            "name" => Field::Name,
            "uuid" => Field::Uuid,
            "read_ahead" => Field::ReadAhead,
            "blkdevname" => Field::BlkDevName,
            "attr" => Field::Attr,
            "tables_loaded" => Field::TablesLoaded,
            "suspended" => Field::Suspended,
            "readonly" => Field::ReadOnly,
            "devno" => Field::DevNo,
            "major" => Field::Major,
            "minor" => Field::Minor,
            "open" => Field::Open,
            "segments" => Field::Segments,
            "events" => Field::Events,
            "interposes" => Field::Interposes,
            "redirected" => Field::Redirected,
            "unavailable" => Field::Unavailable,
            _ => return None,
        })
    }

    /// Heading and width from dmsetup.c's `_report_fields`.
    fn column(self) -> Column {
        match self {
            Field::Name => Column::str("Name", 16),
            Field::Uuid => Column::str("UUID", 32),
            Field::ReadAhead => Column::num("RAhead", 6),
            Field::BlkDevName => Column::str("BlkDevName", 16),
            Field::Attr => Column::str("Stat", 4),
            Field::TablesLoaded => Column::str("Tables", 6),
            Field::Suspended => Column::str("Suspended", 9),
            Field::ReadOnly => Column::str("Read-only", 9),
            Field::DevNo => Column::str("DevNo", 5),
            Field::Major => Column::num("Maj", 3),
            Field::Minor => Column::num("Min", 3),
            Field::Open => Column::num("Open", 4),
            Field::Segments => Column::num("Targ", 4),
            Field::Events => Column::num("Event", 6),
            Field::Interposes => Column::str("Interposes", 10),
            Field::Redirected => Column::num("Redirected", 10),
            Field::Unavailable => Column::str("Unavailable", 11),
        }
    }

    fn value(self, i: &InfoRecord) -> String {
        match self {
            Field::Name => i.name.clone(),
            Field::Uuid => i.uuid.clone().unwrap_or_default(),
            Field::ReadAhead if i.no_block_device => "0".into(),
            Field::ReadAhead => READ_AHEAD.to_string(),
            Field::BlkDevName => format!("dm-{}", i.minor),
            Field::Attr => attr(i),
            Field::TablesLoaded => match (i.live_present, i.inactive_present) {
                (true, true) => "Both",
                (true, false) => "Live",
                (false, true) => "Inactive",
                (false, false) => "None",
            }
            .into(),
            Field::Suspended => if i.suspended { "Suspended" } else { "Active" }.into(),
            Field::ReadOnly => if i.read_only {
                "Read-only"
            } else {
                "Writeable"
            }
            .into(),
            Field::DevNo => format!("{}:{}", i.major, i.minor),
            Field::Major => i.major.to_string(),
            Field::Minor => i.minor.to_string(),
            Field::Open => i.open_count.to_string(),
            Field::Segments => i.target_count.to_string(),
            Field::Events => i.event_nr.to_string(),
            Field::Interposes => i
                .interposers
                .iter()
                .map(|p| format!("{} {}+{}", p.device, p.start, p.len))
                .collect::<Vec<_>>()
                .join(","),
            Field::Redirected => i.redirected.to_string(),
            Field::Unavailable => i.unavailable.clone().unwrap_or_default(),
        }
    }
}

/// Every field name `-o` accepts, for the error message and `--help`.
pub const FIELD_NAMES: &str = "name, uuid, read_ahead, blkdevname, attr, tables_loaded, \
suspended, readonly, devno, major, minor, open, segments, events; udm: interposes, redirected, \
unavailable";

/// Parses `-o`: a comma-separated field list, or `+list` to append to the defaults (as
/// dmsetup.c `_report_init` does).
pub fn parse_fields(spec: Option<&str>) -> Result<Vec<Field>, String> {
    let full = match spec {
        None => DEFAULT_FIELDS.to_string(),
        Some(s) if s.starts_with('+') => format!("{DEFAULT_FIELDS},{}", &s[1..]),
        Some(s) => s.to_string(),
    };
    full.split(',')
        .filter(|f| !f.is_empty())
        .map(|f| {
            Field::parse(f.trim())
                .ok_or_else(|| format!("Unrecognised field: {f} (fields are: {FIELD_NAMES})"))
        })
        .collect()
}

/// `info -c`: one row per device under dmsetup's headings.
pub fn info_columns(infos: &[InfoRecord], fields: &[Field], style: &ReportStyle) -> String {
    let cols: Vec<Column> = fields.iter().map(|f| f.column()).collect();
    let rows: Vec<Vec<String>> = infos
        .iter()
        .map(|i| fields.iter().map(|f| f.value(i)).collect())
        .collect();
    render(&cols, &rows, style)
}

#[cfg(test)]
mod tests {
    use super::*;
    use udm_proto::InterposerRecord;

    pub(crate) fn rec(name: &str) -> InfoRecord {
        InfoRecord {
            name: name.into(),
            uuid: None,
            major: 253,
            minor: 0,
            suspended: false,
            read_only: false,
            live_present: true,
            inactive_present: false,
            open_count: 0,
            event_nr: 0,
            target_count: 1,
            deferred_remove: false,
            sectors: 2048,
            interposed: false,
            interposers: vec![],
            redirected: 0,
            unavailable: None,
            no_block_device: false,
        }
    }

    #[test]
    fn unavailable_line_and_field() {
        let mut i = rec("v");
        i.live_present = false;
        i.unavailable = Some("device d0 is unavailable: /srv/d0.img: gone".into());
        let s = info_long(&i);
        assert!(
            s.contains("Number of targets: 1\nUnavailable:       device d0 is unavailable: /srv/d0.img: gone\n"),
            "{s}"
        );
        assert!(!info_long(&rec("w")).contains("Unavailable"));
        let f = parse_fields(Some("name,unavailable")).unwrap();
        assert_eq!(
            info_columns(&[i], &f, &ReportStyle::noheadings()),
            "v:device d0 is unavailable: /srv/d0.img: gone\n"
        );
    }

    #[test]
    fn long_form_matches_dmsetup() {
        // The shape of real `dmsetup info` output (mpathb example, dm-devel 2019).
        let mut r = rec("mpathb");
        r.event_nr = 7;
        r.minor = 5;
        r.uuid = Some("mpath-3600d0230000000000e13954ed5f89301".into());
        assert_eq!(
            info_long(&r),
            "Name:              mpathb\n\
             State:             ACTIVE\n\
             Read Ahead:        256\n\
             Tables present:    LIVE\n\
             Open count:        0\n\
             Event number:      7\n\
             Major, minor:      253, 5\n\
             Number of targets: 1\n\
             UUID: mpath-3600d0230000000000e13954ed5f89301\n\n"
        );
    }

    #[test]
    fn long_form_states_and_tables() {
        let mut r = rec("a");
        r.suspended = true;
        r.read_only = true;
        r.deferred_remove = true;
        r.live_present = true;
        r.inactive_present = true;
        let s = info_long(&r);
        assert!(s.contains("State:             SUSPENDED (READ-ONLY) (DEFERRED REMOVE)\n"));
        assert!(s.contains("Tables present:    LIVE & INACTIVE\n"));
        r.live_present = false;
        assert!(info_long(&r).contains("Tables present:    INACTIVE\n"));
        r.inactive_present = false;
        assert!(info_long(&r).contains("Tables present:    None\n"));
        assert!(!info_long(&r).contains("UUID"));
    }

    #[test]
    fn interposed_devices_get_udm_lines_after_targets() {
        let mut r = rec("o");
        r.interposed = true;
        r.redirected = 42;
        r.interposers = vec![InterposerRecord {
            device: "vda".into(),
            dev: "254:0".into(),
            start: 0,
            len: 2048,
            attached: true,
        }];
        r.uuid = Some("U".into());
        assert!(info_long(&r).ends_with(
            "Number of targets: 1\n\
             Interposer:        vda 0+2048 attached\n\
             Redirected:        42\n\
             UUID: U\n\n"
        ));
    }

    #[test]
    fn columns_match_dmsetup_defaults() {
        // Field widths from dmsetup.c _report_fields: Name 16, Maj 3, Min 3, Stat 4, Open 4,
        // Targ 4, Event 6, UUID 32; numbers right-aligned; every field padded.
        let mut a = rec("vg-root");
        a.open_count = 1;
        a.uuid = Some("LVM-abc".into());
        let mut b = rec("snap");
        b.minor = 12;
        b.suspended = true;
        b.inactive_present = true;
        b.read_only = true;
        let fields = parse_fields(None).unwrap();
        let out = info_columns(&[a, b], &fields, &ReportStyle::default());
        let expected = format!(
            "Name             Maj Min Stat Open Targ Event  UUID{}\n\
             vg-root          253   0 L--w    1    1      0 LVM-abc{}\n\
             snap             253  12 LIsr    0    1      0 {}\n",
            " ".repeat(28),
            " ".repeat(25),
            " ".repeat(32)
        );
        assert_eq!(out, expected);
    }

    #[test]
    fn columns_noheadings_and_field_selection() {
        let fields = parse_fields(Some("name,attr")).unwrap();
        assert_eq!(
            info_columns(&[rec("x")], &fields, &ReportStyle::noheadings()),
            "x:L--w\n"
        );
        assert_eq!(parse_fields(Some("+devno")).unwrap().len(), 9);
        assert!(parse_fields(Some("bogus")).is_err());
    }
}
