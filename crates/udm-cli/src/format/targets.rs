//! `targets` and `version` (lvm2 `libdm/dm-tools/dmsetup.c` `_targets`, `_version`).

use udm_proto::{TargetRecord, VersionRecord};

/// `printf("%-16s v%d.%d.%d\n")` per registered target.
pub fn targets(t: &[TargetRecord]) -> String {
    t.iter()
        .map(|t| {
            format!(
                "{:<16} v{}.{}.{}\n",
                t.name, t.version[0], t.version[1], t.version[2]
            )
        })
        .collect()
}

/// dmsetup's two lines (`Library version:   %s`, `Driver version:    %s`), saying udm: the
/// library is this CLI, the driver is udmd speaking the dm interface version it follows, so a
/// script reading the third word of `Driver version:` still gets a dm interface version.
pub fn version(cli_version: &str, v: Option<&VersionRecord>) -> String {
    let mut s = format!(
        "Library version:   {cli_version} (udm-cli, protocol {})\n",
        udm_proto::PROTOCOL_VERSION
    );
    if let Some(v) = v {
        s.push_str(&format!(
            "Driver version:    {} (udmd {}, protocol {})\n",
            v.dm_interface, v.daemon, v.protocol
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_padded_to_16() {
        let t = [
            TargetRecord {
                name: "snapshot-origin".into(),
                version: [1, 9, 0],
            },
            TargetRecord {
                name: "linear".into(),
                version: [1, 5, 0],
            },
        ];
        assert_eq!(
            targets(&t),
            "snapshot-origin  v1.9.0\nlinear           v1.5.0\n"
        );
    }

    #[test]
    fn version_lines() {
        let v = VersionRecord {
            daemon: "0.1.0".into(),
            protocol: 1,
            dm_interface: "4.50.0".into(),
        };
        assert_eq!(
            version("0.1.0", Some(&v)),
            "Library version:   0.1.0 (udm-cli, protocol 1)\n\
             Driver version:    4.50.0 (udmd 0.1.0, protocol 1)\n"
        );
    }
}
