//! `table` and `status` lines (lvm2 `libdm/dm-tools/dmsetup.c` `_status`):
//! `printf(FMTu64 " " FMTu64 " %s ", start, length, target_type)` then the parameters and a
//! newline, so a target without parameters keeps its trailing space (`0 2048 zero `). With
//! several devices each line is prefixed `name: `; a device without a table prints an empty line.

use udm_proto::DeviceLines;

/// One target line exactly as dmsetup prints it, without the newline.
pub fn target_line(start: u64, len: u64, target_type: &str, params: &str) -> String {
    format!("{start} {len} {target_type} {params}")
}

/// Lines of every device. `target` keeps only lines of that target type (`--target`);
/// `multiple` is dmsetup's `multiple_devices` (no device named, or more than one).
pub fn device_lines(devs: &[DeviceLines], target: Option<&str>, multiple: bool) -> String {
    let mut out = String::new();
    for d in devs {
        let prefix = if multiple {
            format!("{}: ", d.name)
        } else {
            String::new()
        };
        if d.lines.is_empty() {
            // dm_get_next_target yields one NULL target: the prefix and a newline, unless a
            // --target filter skips it.
            if target.is_none() {
                out.push_str(&prefix);
                out.push('\n');
            }
            continue;
        }
        for l in &d.lines {
            if target.is_some_and(|t| t != l.target_type) {
                continue;
            }
            out.push_str(&prefix);
            out.push_str(&target_line(l.start, l.len, &l.target_type, &l.params));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use udm_proto::TableLine;

    fn dl(name: &str, lines: &[(u64, u64, &str, &str)]) -> DeviceLines {
        DeviceLines {
            name: name.into(),
            lines: lines
                .iter()
                .map(|(s, l, t, p)| TableLine {
                    start: *s,
                    len: *l,
                    target_type: (*t).into(),
                    params: (*p).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn single_device_no_prefix_trailing_space_kept() {
        let d = [dl("z", &[(0, 2048, "zero", "")])];
        assert_eq!(device_lines(&d, None, false), "0 2048 zero \n");
    }

    #[test]
    fn several_devices_are_prefixed() {
        let d = [
            dl("a", &[(0, 8, "linear", "254:0 0"), (8, 8, "error", "")]),
            dl("b", &[(0, 4, "striped", "2 8 254:0 0 254:1 0")]),
        ];
        assert_eq!(
            device_lines(&d, None, true),
            "a: 0 8 linear 254:0 0\na: 8 8 error \nb: 0 4 striped 2 8 254:0 0 254:1 0\n"
        );
    }

    #[test]
    fn target_filter_and_tableless_devices() {
        let d = [
            dl("a", &[(0, 8, "linear", "254:0 0"), (8, 8, "error", "")]),
            dl("empty", &[]),
        ];
        assert_eq!(device_lines(&d, Some("error"), true), "a: 8 8 error \n");
        assert_eq!(
            device_lines(&d, None, true),
            "a: 0 8 linear 254:0 0\na: 8 8 error \nempty: \n"
        );
        assert_eq!(device_lines(&d[1..], None, false), "\n");
    }
}
