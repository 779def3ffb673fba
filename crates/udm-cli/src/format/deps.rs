//! `deps` (lvm2 `libdm/dm-tools/dmsetup.c` `_deps`): `printf("%d dependencies\t:", count)` then
//! ` (%d, %d)` per device, or ` (%s)` with `-o devname|blkdevname`, and a newline; prefixed with
//! `name: ` when several devices are printed.

use udm_proto::{DepRecord, DeviceDeps};

/// How devices are named in `deps` and `ls` (dmsetup's `-o devno|devname|blkdevname`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DevNameStyle {
    /// `major:minor` (the default).
    #[default]
    DevNo,
    /// The device's name (dm name for mapped devices, kernel name otherwise).
    DevName,
    /// The block device name: `dm-MINOR` for mapped devices, the disk's name otherwise.
    BlkDevName,
}

impl DevNameStyle {
    /// Parses dmsetup's `-o` list for `deps` and `ls` (the last recognised word wins, as in
    /// dmsetup.c `_process_options`).
    pub fn parse(spec: &str) -> Result<DevNameStyle, String> {
        let mut style = DevNameStyle::DevNo;
        for w in spec.split(',').filter(|w| !w.is_empty()) {
            style = match w {
                "devno" => DevNameStyle::DevNo,
                "devname" => DevNameStyle::DevName,
                "blkdevname" => DevNameStyle::BlkDevName,
                _ => {
                    return Err(format!(
                        "Option not recognised: {w}. (Options are: devno, devname, blkdevname.)"
                    ))
                }
            };
        }
        Ok(style)
    }
}

/// The `(..)` label of a dependency. `is_mapped` tells whether it is a mapped device (its
/// block device name is then `dm-MINOR`).
pub fn dep_label(d: &DepRecord, style: DevNameStyle, is_mapped: bool) -> String {
    match style {
        DevNameStyle::DevNo => format!("({}, {})", d.major, d.minor),
        DevNameStyle::DevName => format!("({})", d.name),
        DevNameStyle::BlkDevName if is_mapped => format!("(dm-{})", d.minor),
        DevNameStyle::BlkDevName => format!("({})", d.name),
    }
}

/// The `deps` line of one device.
pub fn deps_line(
    d: &DeviceDeps,
    multiple: bool,
    style: DevNameStyle,
    is_mapped: &dyn Fn(&DepRecord) -> bool,
) -> String {
    let mut s = String::new();
    if multiple {
        s.push_str(&d.name);
        s.push_str(": ");
    }
    s.push_str(&format!("{} dependencies\t:", d.deps.len()));
    for dep in &d.deps {
        s.push(' ');
        s.push_str(&dep_label(dep, style, is_mapped(dep)));
    }
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dd() -> DeviceDeps {
        DeviceDeps {
            name: "snap".into(),
            deps: vec![
                DepRecord {
                    major: 254,
                    minor: 16,
                    name: "cow".into(),
                },
                DepRecord {
                    major: 253,
                    minor: 2,
                    name: "base-real".into(),
                },
            ],
        }
    }

    #[test]
    fn devno_form_matches_dmsetup() {
        // e.g. real output: "docker-pool: 1 dependencies\t: (253, 2)"
        assert_eq!(
            deps_line(&dd(), false, DevNameStyle::DevNo, &|_| false),
            "2 dependencies\t: (254, 16) (253, 2)\n"
        );
        assert_eq!(
            deps_line(&dd(), true, DevNameStyle::DevNo, &|_| false),
            "snap: 2 dependencies\t: (254, 16) (253, 2)\n"
        );
    }

    #[test]
    fn name_forms() {
        assert_eq!(
            deps_line(&dd(), false, DevNameStyle::DevName, &|_| false),
            "2 dependencies\t: (cow) (base-real)\n"
        );
        assert_eq!(
            deps_line(&dd(), false, DevNameStyle::BlkDevName, &|d| d.major == 253),
            "2 dependencies\t: (cow) (dm-2)\n"
        );
        let empty = DeviceDeps {
            name: "z".into(),
            deps: vec![],
        };
        assert_eq!(
            deps_line(&empty, false, DevNameStyle::DevNo, &|_| false),
            "0 dependencies\t:\n"
        );
    }

    #[test]
    fn option_parsing() {
        assert_eq!(DevNameStyle::parse("devname"), Ok(DevNameStyle::DevName));
        assert_eq!(
            DevNameStyle::parse("devno,blkdevname"),
            Ok(DevNameStyle::BlkDevName)
        );
        assert!(DevNameStyle::parse("tree").is_err());
    }
}
