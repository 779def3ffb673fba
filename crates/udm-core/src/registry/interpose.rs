//! The interposer rules of a table, decided from plain data so they are testable without a
//! registry: which devices an `--interpose` table hooks ([`pick`]) and whether it may
//! ([`check`]): a device interposing itself is EINVAL, a second interposer of one mapped device
//! EALREADY, a range beyond the device's end ERANGE, a range overlapping another mapped
//! device's interposer on the same device EBUSY (`../shared/DESIGN.md`, "Interposition
//! semantics").

use crate::error::{CoreError, Result};
use udm_types::{DevId, Errno};

/// An interposer: sectors `[start, start + len)` of device `dev`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct HookSpec {
    pub(super) dev: DevId,
    pub(super) start: u64,
    pub(super) len: u64,
}

impl HookSpec {
    fn overlaps(&self, o: &HookSpec) -> bool {
        self.dev == o.dev && self.start < o.start + o.len && o.start < self.start + self.len
    }
}

/// One device a table's target opened: (device use index, target begin, target len, marked
/// with `[interpose]`).
pub(super) type Open = (usize, u64, u64, bool);

/// A live interposer of mapped device `owner` (named `owner_name`).
#[derive(Clone, Debug)]
pub(super) struct LiveHook {
    pub(super) owner: DevId,
    pub(super) owner_name: String,
    pub(super) hook: HookSpec,
}

/// What [`check`] needs to know about an interposed device.
pub(super) struct Target {
    /// Its name, for messages.
    pub(super) name: String,
    /// Its size in sectors.
    pub(super) size: u64,
}

/// The interposers an `--interpose` table attaches, each with the use index of its device
/// (`devs[idx]` is that device): the devices marked `[interpose]` when any is, else the one
/// device of each target that names a single device.
pub(super) fn pick(opens: &[Open], devs: &[DevId]) -> Vec<(usize, HookSpec)> {
    let hook = |idx: usize, start: u64, len: u64| {
        let dev = devs[idx];
        (idx, HookSpec { dev, start, len })
    };
    let mut hooks: Vec<(usize, HookSpec)> = Vec::new();
    if opens.iter().any(|o| o.3) {
        for &(idx, begin, len, marked) in opens {
            // A target may open one marked device several times (delay: once per class).
            let seen = hooks
                .iter()
                .any(|(i, h)| *i == idx && h.start == begin && h.len == len);
            if marked && !seen {
                hooks.push(hook(idx, begin, len));
            }
        }
        return hooks;
    }
    let mut by_target: std::collections::BTreeMap<u64, Vec<(usize, u64)>> = Default::default();
    for &(idx, begin, len, _) in opens {
        let devs = by_target.entry(begin).or_default();
        // A target may open one device several times (delay: once per class).
        if !devs.iter().any(|(i, _)| *i == idx) {
            devs.push((idx, len));
        }
    }
    for (begin, devs) in by_target {
        if let [(idx, len)] = devs[..] {
            hooks.push(hook(idx, begin, len));
        }
    }
    hooks
}

/// The owner of a live interposer, other than `me`, overlapping `h`.
pub(super) fn overlapping<'a>(live: &'a [LiveHook], me: DevId, h: &HookSpec) -> Option<&'a str> {
    live.iter()
        .find(|l| l.owner != me && l.hook.overlaps(h))
        .map(|l| l.owner_name.as_str())
}

/// Decides whether mapped device `me` (named `name`) may attach `hooks`, given the live
/// interposers of every mapped device; `target(idx)` describes the device of use `idx`.
pub(super) fn check(
    me: DevId,
    name: &str,
    hooks: &[(usize, HookSpec)],
    target: impl Fn(usize) -> Target,
    live: &[LiveHook],
) -> Result<()> {
    if hooks.iter().any(|(_, h)| h.dev == me) {
        return Err(CoreError::invalid(format!(
            "{name}: a mapped device cannot interpose itself"
        )));
    }
    if hooks.len() > 1 {
        return Err(CoreError::new(
            Errno::EALREADY,
            format!(
                "{name}: a mapped device can have only one interposer; the table would attach {}",
                hooks.len()
            ),
        ));
    }
    for (idx, h) in hooks {
        let t = target(*idx);
        if h.start.checked_add(h.len).is_none_or(|end| end > t.size) {
            return Err(CoreError::new(
                Errno::ERANGE,
                format!(
                    "{name}: interposer range {}+{} is beyond the end of {} ({} sectors)",
                    h.start, h.len, t.name, t.size
                ),
            ));
        }
        if let Some(other) = overlapping(live, me, h) {
            return Err(CoreError::Busy(format!(
                "{name}: interposer range {}+{} of {} overlaps the interposer of {other}",
                h.start, h.len, t.name
            )));
        }
    }
    Ok(())
}

/// At `resume`: the interposers of `me`'s inactive table, checked at load, still overlap no
/// other mapped device's live interposer (another table may have gone live since).
pub(super) fn check_attach(
    me: DevId,
    name: &str,
    hooks: &[HookSpec],
    live: &[LiveHook],
) -> Result<()> {
    match hooks.iter().find_map(|h| overlapping(live, me, h)) {
        Some(other) => Err(CoreError::Busy(format!(
            "{name}: interposer range overlaps the interposer of {other}"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use udm_types::errno::HasErrno;

    const ME: DevId = DevId::new(253, 0);
    const OTHER: DevId = DevId::new(253, 1);
    const DISK: DevId = DevId::new(8, 0);
    const DISK2: DevId = DevId::new(8, 16);

    fn h(dev: DevId, start: u64, len: u64) -> HookSpec {
        HookSpec { dev, start, len }
    }

    fn live(owner: DevId, hook: HookSpec) -> LiveHook {
        LiveHook {
            owner,
            owner_name: format!("md{}", owner.minor),
            hook,
        }
    }

    /// Every interposed device is 2048 sectors.
    fn run(hooks: &[HookSpec], live: &[LiveHook]) -> Result<()> {
        let hooks: Vec<_> = hooks.iter().copied().enumerate().collect();
        let target = |_| Target {
            name: "d".into(),
            size: 2048,
        };
        check(ME, "me", &hooks, target, live)
    }

    fn errno(r: Result<()>) -> Option<Errno> {
        r.err().map(|e| e.errno())
    }

    #[test]
    fn one_interposer_within_the_device_is_allowed() {
        assert!(run(&[h(DISK, 0, 2048)], &[]).is_ok());
        assert!(run(&[], &[]).is_ok(), "no interposer at all");
    }

    #[test]
    fn overlapping_another_devices_interposer_is_ebusy() {
        let other = [live(OTHER, h(DISK, 1000, 100))];
        let r = run(&[h(DISK, 0, 1001)], &other);
        assert_eq!(errno(r), Some(Errno::EBUSY));
        let msg = run(&[h(DISK, 1099, 10)], &other).unwrap_err().to_string();
        assert!(msg.contains("overlaps the interposer of md1"), "{msg}");
    }

    #[test]
    fn adjacent_or_elsewhere_is_not_an_overlap() {
        let other = [live(OTHER, h(DISK, 1000, 100))];
        assert!(
            run(&[h(DISK, 0, 1000)], &other).is_ok(),
            "ends where it starts"
        );
        assert!(
            run(&[h(DISK, 1100, 948)], &other).is_ok(),
            "starts where it ends"
        );
        assert!(
            run(&[h(DISK2, 1000, 100)], &other).is_ok(),
            "another device"
        );
    }

    #[test]
    fn its_own_live_interposer_is_no_conflict() {
        // A reload replacing the live table of `me` with the same range.
        let mine = [live(ME, h(DISK, 0, 2048))];
        assert!(run(&[h(DISK, 0, 2048)], &mine).is_ok());
    }

    #[test]
    fn two_interposers_of_one_mapped_device_are_ealready() {
        let r = run(&[h(DISK, 0, 1024), h(DISK, 1024, 1024)], &[]);
        assert_eq!(errno(r), Some(Errno::EALREADY));
        let r = run(&[h(DISK, 0, 1024), h(DISK2, 0, 1024)], &[]);
        assert_eq!(errno(r), Some(Errno::EALREADY), "on two devices too");
    }

    #[test]
    fn interposing_itself_is_einval() {
        let r = run(&[h(ME, 0, 8)], &[]);
        assert_eq!(errno(r), Some(Errno::EINVAL));
    }

    #[test]
    fn beyond_the_end_is_erange() {
        assert_eq!(errno(run(&[h(DISK, 2000, 49)], &[])), Some(Errno::ERANGE));
        assert_eq!(errno(run(&[h(DISK, 2048, 1)], &[])), Some(Errno::ERANGE));
        let wraps = h(DISK, u64::MAX - 1, 4);
        assert_eq!(errno(run(&[wraps], &[])), Some(Errno::ERANGE), "overflow");
    }

    #[test]
    fn attach_at_resume_rechecks_overlap_with_tables_gone_live_since() {
        let other = [live(OTHER, h(DISK, 0, 10))];
        let r = check_attach(ME, "me", &[h(DISK, 9, 1)], &other);
        assert_eq!(errno(r), Some(Errno::EBUSY));
        assert!(check_attach(ME, "me", &[h(DISK, 10, 1)], &other).is_ok());
        let mine = [live(ME, h(DISK, 0, 10))];
        assert!(check_attach(ME, "me", &[h(DISK, 0, 10)], &mine).is_ok());
    }

    #[test]
    fn pick_marked_devices_only_when_any_is_marked() {
        let devs = [DISK, DISK2];
        // snapshot-like target at 0 naming both devices, the second marked.
        let opens = [(0, 0, 100, false), (1, 0, 100, true), (1, 0, 100, true)];
        assert_eq!(pick(&opens, &devs), vec![(1, h(DISK2, 0, 100))]);
    }

    #[test]
    fn pick_unmarked_the_single_device_of_each_target() {
        let devs = [DISK, DISK2];
        // Target at 0 names DISK (twice, as delay does); target at 100 names both.
        let opens = [
            (0, 0, 100, false),
            (0, 0, 100, false),
            (0, 100, 50, false),
            (1, 100, 50, false),
        ];
        assert_eq!(pick(&opens, &devs), vec![(0, h(DISK, 0, 100))]);
    }
}
