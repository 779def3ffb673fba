//! `udmsetup`'s command line: dmsetup's commands in dmsetup's order (lvm2 `dmsetup.c`
//! `_dmsetup_commands`), with dmsetup's options, plus `--interpose`, `--json` and the udm-only
//! `disk` and `export` verbs.

use clap::{ArgGroup, Args, Parser, Subcommand};
use std::path::PathBuf;

const ABOUT: &str = "dmsetup-compatible control of udm, the user-space device-mapper";

const LONG_ABOUT: &str = "\
udmsetup manages udm mapped devices with dmsetup's commands, options and output formats,
over udmd's control socket. Tables use dmsetup's syntax ('<start> <length> <target> <args>',
512-byte sectors); a device in a table may be a udm name, a major:minor or an absolute path.

udm additions: --interpose (attach a table to a device in use, the seed's DM_INTERPOSED_FLAG),
--json on every read command, 'disk' (the devices udm serves) and 'export' (NBD, FUSE, ublk,
vhost-user).
In 'info' output, interposed devices carry two udm-only lines after 'Number of targets:':
  Interposer:        <dev> <start>+<len> attached|detached
  Redirected:        <requests redirected into the device>";

const AFTER: &str = "\
<device> may be a device name or (if only one) -u <uuid>.
The control socket defaults to $UDM_RUNTIME_DIR/control.sock (else /run/udm as root,
else $XDG_RUNTIME_DIR/udm).";

/// `udmsetup [global options] <command>`.
#[derive(Debug, Parser)]
#[command(name = "udmsetup", version, about = ABOUT, long_about = LONG_ABOUT, after_help = AFTER)]
pub struct Cli {
    /// udmd's control socket.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the protocol records as JSON (read commands).
    #[arg(long, global = true)]
    pub json: bool,
    /// More output: device info after create/load/suspend/resume/wait, info before table
    /// lines, the daemon's message with "Device does not exist.".
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Select the device by uuid (create: the new device's uuid).
    #[arg(short = 'u', long = "uuid", global = true, value_name = "UUID")]
    pub uuid: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Every command, in `dmsetup help` order.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a mapped device, load its table and resume it.
    #[command(long_about = CREATE_LONG)]
    Create(CreateArgs),
    /// Remove mapped devices.
    #[command(
        long_about = "Remove mapped devices. Fails with EBUSY while a device is open \
(exported, or used by another table) unless --deferred, which removes it at last close.\n\
--force first replaces the table with an 'error' table so that pending I/O fails."
    )]
    Remove(RemoveArgs),
    /// Suspend mapped devices (hold new I/O, drain I/O in flight).
    #[command(
        long_about = "Suspend mapped devices: new I/O is held, I/O in flight drains. \
Suspending an interposed device holds the I/O of the range it interposes on the original \
device: this is the point in time of a live snapshot."
    )]
    Suspend(SuspendArgs),
    /// Resume mapped devices (make the inactive table live, release held I/O).
    Resume(ResumeArgs),
    /// Load a table into the inactive slot of a device.
    #[command(long_about = LOAD_LONG)]
    Load(LoadArgs),
    /// Destroy the inactive table of devices.
    Clear(NamesArgs),
    /// Same as load.
    #[command(long_about = LOAD_LONG)]
    Reload(LoadArgs),
    /// Rename a device, or set its uuid (--setuuid).
    #[command(
        long_about = "Rename a device: 'rename OLD NEW', or set the uuid of a device that \
has none: 'rename NAME --setuuid UUID'. With -u UUID, only the new name is given."
    )]
    Rename(RenameArgs),
    /// Send a message to the target at SECTOR (or '@...' to the core).
    #[command(
        long_about = "Send a message to the target of NAME that contains SECTOR, e.g.\n  \
udmsetup message e 0 checkpoint\nMessages starting with '@' go to the udm core \
(@cancel_deferred_remove). A reply, if any, is printed."
    )]
    Message(MessageArgs),
    /// List mapped devices ('name\t(major:minor)'), or their dependency tree.
    #[command(
        long_about = "List mapped devices as 'name\\t(major:minor)' in name order. \
--tree draws each mapped device with the devices it uses below it (-o inverted: the other way \
round); devices that are not mapped devices show as '(major:minor)' only, or with \
-o blkdevname as '<name> (major:minor)'. udm marks a mapped device that interposes another \
with ' [interposes DEV]' after its node."
    )]
    Ls(LsArgs),
    /// Show device information (all devices without a name).
    #[command(
        long_about = "Show device information in dmsetup's long form, or with -c in \
dmsetup's columns (default fields name,major,minor,attr,open,segments,events,uuid; attr is \
L/- live table, I/- inactive table, s/- suspended, r/w read-only).\n\n\
udm-only: a device whose live table was loaded with --interpose has two more lines after \
'Number of targets:':\n  \
Interposer:        <device> <start>+<len> attached|detached\n  \
Redirected:        <requests redirected into this device>\n\
and the column fields 'interposes' and 'redirected' (-c -o +interposes,redirected)."
    )]
    Info(InfoArgs),
    /// Show the devices each device uses.
    Deps(DepsArgs),
    /// Show the status line of each target.
    Status(StatusArgs),
    /// Show the table of each device.
    Table(TableArgs),
    /// Wait until the device's event number differs from EVENT_NR (default 0).
    Wait(WaitArgs),
    /// List the registered target types and their versions.
    Targets,
    /// Show the udm CLI and daemon versions.
    Version,
    /// udm: manage disks, the backing files and block devices udm serves.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// udm: manage exports (NBD, FUSE file, ublk) through which clients reach devices.
    #[command(subcommand)]
    Export(ExportCommand),
}

const CREATE_LONG: &str = "\
Create a mapped device NAME. The table comes from --table, else from FILE, else from stdin
(none at all with --notable). As in dmsetup, an empty table creates a device without a table.

--interpose is the seed's DM_INTERPOSED_FLAG: the table's devices are opened shared (no claim)
and an interposer is attached to the device marked '[interpose]DEV' (or to the one device of a
single-device target such as linear or snapshot-origin) when the table goes live. From then on
all I/O sent to DEV within [start, start+len) of the target goes through the new device.
--freeze MOUNTPOINT freezes that local filesystem (FIFREEZE/FITHAW) around the switch.

Examples:
  udmsetup create lin --table '0 2048 linear vda 0'
  udmsetup create z --table '0 2097152 zero'
  echo '0 1024 linear 254:0 0' | udmsetup create lin2
  udmsetup create origin --interpose --table '0 2048 snapshot-origin vda'
  udmsetup create -u MYUUID -n empty
  udmsetup create --concise 'dev1,,,,0 100 linear vda 0,100 100 error;dev2,,,ro,0 1 error'";

const LOAD_LONG: &str = "\
Load a table into the inactive slot of NAME (from --table, FILE or stdin); 'resume' makes it
live. --interpose loads it with DM_INTERPOSED_FLAG (see 'create --help'); loading a table
without --interpose over an interposed one detaches the interposer at resume.

Examples:
  udmsetup load lin --table '0 4096 linear vda 0'
  udmsetup load lin table.txt && udmsetup resume lin
  udmsetup load o --interpose --table '0 2048 delay [interpose]vda 0 100'";

/// `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name of the new device (with --concise: the concise specification).
    #[arg(value_name = "DEVICE")]
    pub name: Option<String>,
    /// Table file (stdin when neither this nor --table is given).
    pub file: Option<PathBuf>,
    /// Create devices from a concise specification (argument or stdin):
    /// name,uuid,minor,flags,table[,table...][;name,...]; flags ro, rw or empty (udm: +interpose);
    /// udm assigns its own minors.
    #[arg(long, conflicts_with_all = ["table", "notable", "file", "interpose", "freeze", "readonly"])]
    pub concise: bool,
    /// The table text (lines separated by newlines).
    #[arg(long, value_name = "TABLE", conflicts_with = "notable")]
    pub table: Option<String>,
    /// Create the device without a table.
    #[arg(short = 'n', long)]
    pub notable: bool,
    /// Read-only table.
    #[arg(short = 'r', long)]
    pub readonly: bool,
    /// Open the table's devices shared and attach an interposer (DM_INTERPOSED_FLAG).
    #[arg(long)]
    pub interpose: bool,
    /// Freeze this mounted filesystem around the interposer attach.
    #[arg(long, value_name = "MOUNTPOINT")]
    pub freeze: Option<PathBuf>,
}

/// `remove`.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// Replace the table with an 'error' table first.
    #[arg(short = 'f', long)]
    pub force: bool,
    /// Retry for a few seconds while the device is busy.
    #[arg(long)]
    pub retry: bool,
    /// Remove at last close if open now.
    #[arg(long)]
    pub deferred: bool,
    /// Devices.
    #[arg(value_name = "DEVICE")]
    pub names: Vec<String>,
}

/// `suspend`.
#[derive(Debug, Args)]
pub struct SuspendArgs {
    /// Let I/O not yet sent to the device stay queued.
    #[arg(long)]
    pub noflush: bool,
    /// Do not freeze a filesystem on the device.
    #[arg(long)]
    pub nolockfs: bool,
    /// Devices.
    #[arg(value_name = "DEVICE")]
    pub names: Vec<String>,
}

/// `resume`.
#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// Accepted for dmsetup compatibility (no effect on resume).
    #[arg(long)]
    pub noflush: bool,
    /// Accepted for dmsetup compatibility (no effect on resume).
    #[arg(long)]
    pub nolockfs: bool,
    /// Freeze this mounted filesystem around an interposer switch.
    #[arg(long, value_name = "MOUNTPOINT")]
    pub freeze: Option<PathBuf>,
    /// Devices.
    #[arg(value_name = "DEVICE")]
    pub names: Vec<String>,
}

/// `load` / `reload`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// DEVICE [TABLE_FILE] (just [TABLE_FILE] with -u).
    #[arg(value_name = "DEVICE [TABLE_FILE]", num_args = 0..=2)]
    pub args: Vec<String>,
    /// The table text.
    #[arg(long, value_name = "TABLE")]
    pub table: Option<String>,
    /// Read-only table.
    #[arg(short = 'r', long)]
    pub readonly: bool,
    /// Load with DM_INTERPOSED_FLAG.
    #[arg(long)]
    pub interpose: bool,
}

/// Commands taking device names only.
#[derive(Debug, Args)]
pub struct NamesArgs {
    /// Devices.
    #[arg(value_name = "DEVICE")]
    pub names: Vec<String>,
}

/// `rename`.
#[derive(Debug, Args)]
pub struct RenameArgs {
    /// OLD NEW, or NAME UUID with --setuuid.
    #[arg(value_name = "DEVICE NEW_NAME_OR_UUID", num_args = 1..=2, required = true)]
    pub args: Vec<String>,
    /// The last argument is the new uuid.
    #[arg(long)]
    pub setuuid: bool,
}

/// `message`.
#[derive(Debug, Args)]
pub struct MessageArgs {
    /// DEVICE SECTOR MESSAGE... (SECTOR MESSAGE... with -u).
    #[arg(
        value_name = "DEVICE SECTOR MESSAGE",
        num_args = 2..,
        required = true,
        allow_hyphen_values = true,
        trailing_var_arg = true
    )]
    pub args: Vec<String>,
}

/// `ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Only devices with a target of this type.
    #[arg(long, value_name = "TARGET_TYPE")]
    pub target: Option<String>,
    /// Show the dependency tree.
    #[arg(long)]
    pub tree: bool,
    /// devno|devname|blkdevname; with --tree: ascii, utf, vt100, compact, inverted, notrunc,
    /// blkdevname, [no]device, active, open, rw, uuid.
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    pub options: Option<String>,
}

/// `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Columns output (dmsetup's report).
    #[arg(short = 'c', visible_short_alias = 'C', long = "columns")]
    pub columns: bool,
    /// Columns: fields (or +fields to add). name, uuid, read_ahead, blkdevname, attr,
    /// tables_loaded, suspended, readonly, devno, major, minor, open, segments, events;
    /// udm: interposes, redirected.
    #[arg(short = 'o', long = "options", value_name = "FIELDS")]
    pub options: Option<String>,
    /// Columns: no headings, ':'-separated, unaligned.
    #[arg(long)]
    pub noheadings: bool,
    /// Columns: field separator (unaligned).
    #[arg(long, value_name = "SEPARATOR")]
    pub separator: Option<String>,
    /// Devices (all without).
    #[arg(value_name = "DEVICE")]
    pub names: Vec<String>,
}

/// `deps`.
#[derive(Debug, Args)]
pub struct DepsArgs {
    /// devno (default), devname or blkdevname.
    #[arg(short = 'o', long = "options", value_name = "OPTIONS")]
    pub options: Option<String>,
    /// Report the inactive table.
    #[arg(long)]
    pub inactive: bool,
    /// Devices (all without).
    #[arg(value_name = "DEVICE")]
    pub names: Vec<String>,
}

/// `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only lines of this target type.
    #[arg(long, value_name = "TARGET_TYPE")]
    pub target: Option<String>,
    /// Report the inactive table.
    #[arg(long)]
    pub inactive: bool,
    /// Accepted for dmsetup compatibility (no target of udm commits on status).
    #[arg(long)]
    pub noflush: bool,
    /// Devices (all without).
    #[arg(value_name = "DEVICE")]
    pub names: Vec<String>,
}

/// `table`.
#[derive(Debug, Args)]
pub struct TableArgs {
    /// Only lines of this target type.
    #[arg(long, value_name = "TARGET_TYPE")]
    pub target: Option<String>,
    /// One line in the kernel's dm-mod.create= syntax.
    #[arg(long)]
    pub concise: bool,
    /// Accepted for dmsetup compatibility (udm has no target with keys).
    #[arg(long)]
    pub showkeys: bool,
    /// Report the inactive table.
    #[arg(long)]
    pub inactive: bool,
    /// Devices (all without).
    #[arg(value_name = "DEVICE")]
    pub names: Vec<String>,
}

/// `wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// DEVICE [EVENT_NR] ([EVENT_NR] with -u).
    #[arg(value_name = "DEVICE [EVENT_NR]", num_args = 0..=2)]
    pub args: Vec<String>,
    /// Give up after this many milliseconds (ETIMEDOUT-style failure).
    #[arg(long, value_name = "MS")]
    pub timeout: Option<u64>,
    /// Accepted for dmsetup compatibility.
    #[arg(long)]
    pub noflush: bool,
}

/// `disk ...`.
#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Serve a backing file or block device as a udm disk.
    #[command(long_about = "\
Serve a file or block device as the udm disk NAME (with a synthetic major:minor; its
partitions appear as NAME1, NAME2, ...). --create SIZE creates or extends the file first
(sizes take K, M, G, T suffixes; plain numbers are bytes).

Examples:
  udmsetup disk add vda --file /var/lib/images/vm.raw
  udmsetup disk add scratch --file /tmp/scratch.img --create 1G
  udmsetup disk add ro --file /dev/sdb --read-only --direct")]
    Add(DiskAddArgs),
    /// Stop serving a disk (fails while tables or exports use it).
    Remove {
        /// Disk name.
        name: String,
    },
    /// List disks and their partitions.
    List,
    /// Reopen unavailable disks now and bring back what depends on them.
    #[command(long_about = "\
A disk whose backing file could not be opened when udmd started (an unmounted file system, a
late iSCSI login) is kept as unavailable with its tables and exports; udmd retries it every few
seconds (--retry-interval). `disk retry` tries at once: every unavailable device, or NAME (a disk
or mapped device), failing with ENODEV and the reason when NAME is still unavailable.")]
    Retry {
        /// Disk or mapped device (default: every unavailable device).
        name: Option<String>,
    },
}

/// `disk add`.
#[derive(Debug, Args)]
pub struct DiskAddArgs {
    /// Disk name.
    pub name: String,
    /// Backing file or block device.
    #[arg(long, value_name = "PATH")]
    pub file: PathBuf,
    /// Create or extend the file to SIZE first.
    #[arg(long, value_name = "SIZE")]
    pub create: Option<String>,
    /// Serve read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Use O_DIRECT.
    #[arg(long)]
    pub direct: bool,
}

/// `export ...`.
#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Export a device over NBD, as a FUSE file, or as a ublk block device.
    #[command(long_about = "\
Export DEVICE (a disk, partition or mapped device). Exactly one of:
  --nbd [--name NAME]  an NBD export on udmd's Unix socket (and TCP listener if enabled),
                       named after the device unless --name is given
  --fuse DIR           a FUSE file DIR/DEVICE; 'losetup -f --show DIR/DEVICE' makes it a
                       kernel block device that can be formatted and mounted
  --ublk               a /dev/ublkbN block device (Linux 6.4+ with ublk_drv; udmd built with
                       the `ublk` feature); --ublk-id N asks for /dev/ublkbN, --queues and
                       --queue-depth size it (default: a queue per CPU, 64 requests each)
  --vhost-user SOCKET  a vhost-user-blk socket for a VMM (one VM at a time), with
                       --num-queues N virtqueues (default 1); in QEMU:
                       -chardev socket,id=c0,path=SOCKET
                       -device vhost-user-blk-pci,chardev=c0,num-queues=N
                       (guest RAM must be shared: -object memory-backend-memfd,share=on)
An export holds its device like a mount does: a plain table naming it then fails with EBUSY
(use --interpose). Prints the export id and where clients connect.

Examples:
  udmsetup export add vda --nbd
  nbdinfo 'nbd+unix:///vda?socket=/run/udm/nbd.sock'
  udmsetup export add snap --nbd --name backup --read-only
  udmsetup export add lin --fuse /mnt/udm
  udmsetup export add vol --vhost-user /run/udm/vol.sock --num-queues 2")]
    Add(ExportAddArgs),
    /// Remove an export by id (as listed: nbd:NAME, fuse:DIR/DEV, ublk:DEV,
    /// vhost-user:SOCKET), or by the name
    /// of a device that has exactly one export.
    Remove {
        /// Export id, or the name of a device with one export.
        id: String,
    },
    /// List exports with client and traffic counters.
    List,
}

/// `export add`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("kind").required(true).args(["nbd", "fuse", "ublk", "vhost_user"])))]
pub struct ExportAddArgs {
    /// Device to export.
    pub device: String,
    /// NBD export.
    #[arg(long)]
    pub nbd: bool,
    /// NBD export name (default: the device name).
    #[arg(long, requires = "nbd", value_name = "NAME")]
    pub name: Option<String>,
    /// Also serve this NBD export over plain, unauthenticated TCP when udmd runs with
    /// `--nbd-insecure-tcp` (otherwise TCP clients must use TLS). Anyone who can reach the
    /// port can then read and write the device.
    #[arg(long, requires = "nbd")]
    pub insecure_tcp: bool,
    /// Serve a dirty bitmap file (written by `udm backup`) as the NBD metadata context
    /// `qemu:dirty-bitmap:NAME` (repeatable).
    #[arg(long = "dirty-bitmap", requires = "nbd", value_name = "NAME=FILE")]
    pub dirty_bitmaps: Vec<String>,
    /// FUSE file in this directory.
    #[arg(long, value_name = "DIR")]
    pub fuse: Option<PathBuf>,
    /// ublk block device.
    #[arg(long)]
    pub ublk: bool,
    /// ublk device id N, for /dev/ublkbN (default: the driver picks; kept across restarts).
    #[arg(long, requires = "ublk", value_name = "N")]
    pub ublk_id: Option<u32>,
    /// ublk hardware queues, one serving thread each (default: one per CPU).
    #[arg(long, requires = "ublk", value_name = "N")]
    pub queues: Option<u16>,
    /// ublk requests in flight per queue (default 64, at most 4096).
    #[arg(long, requires = "ublk", value_name = "N")]
    pub queue_depth: Option<u16>,
    /// vhost-user-blk socket for a VMM.
    #[arg(long, value_name = "SOCKET")]
    pub vhost_user: Option<PathBuf>,
    /// Virtqueues of the vhost-user-blk device (default 1).
    #[arg(long, requires = "vhost_user", conflicts_with_all = ["nbd", "fuse", "ublk"], value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: Option<u16>,
    /// Read-only export.
    #[arg(short = 'r', long)]
    pub read_only: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_lists_commands_in_dmsetup_order() {
        let help = Cli::command().render_help().to_string();
        let order = [
            "create", "remove", "suspend", "resume", "load", "clear", "reload", "rename",
            "message", "ls", "info", "deps", "status", "table", "wait", "targets", "version",
            "disk", "export",
        ];
        let mut pos = 0;
        for c in order {
            let needle = format!("\n  {c} ");
            let p = help[pos..]
                .find(&needle)
                .unwrap_or_else(|| panic!("{c} missing or out of order in:\n{help}"));
            pos += p + needle.len();
        }
    }

    #[test]
    fn parses_dmsetup_style_lines() {
        let c = Cli::try_parse_from(["udmsetup", "info", "-C", "a", "b"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Info(InfoArgs { columns: true, .. })
        ));
        let c = Cli::try_parse_from(["udmsetup", "message", "e", "0", "@cancel_deferred_remove"])
            .unwrap();
        assert!(matches!(c.command, Command::Message(_)));
        let c = Cli::try_parse_from([
            "udmsetup",
            "create",
            "o",
            "--interpose",
            "--table",
            "0 8 zero",
            "-u",
            "U",
        ])
        .unwrap();
        assert_eq!(c.uuid.as_deref(), Some("U"));
        assert!(Cli::try_parse_from(["udmsetup", "export", "add", "vda"]).is_err());
        assert!(
            Cli::try_parse_from(["udmsetup", "export", "add", "vda", "--nbd", "--ublk"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["udmsetup", "create", "x", "-n", "--table", "0 1 zero"]).is_err()
        );
    }

    #[test]
    fn parses_vhost_user_exports() {
        let add = |args: &[&str]| {
            let mut v = vec!["udmsetup", "export", "add", "vol"];
            v.extend_from_slice(args);
            Cli::try_parse_from(v)
        };
        let c = add(&["--vhost-user", "/run/v.sock", "--num-queues", "4", "-r"]).unwrap();
        let Command::Export(ExportCommand::Add(a)) = c.command else {
            panic!("not export add");
        };
        assert_eq!(
            a.vhost_user.as_deref(),
            Some(std::path::Path::new("/run/v.sock"))
        );
        assert_eq!((a.num_queues, a.read_only), (Some(4), true));
        let Command::Export(ExportCommand::Add(a)) = add(&["--vhost-user", "s"]).unwrap().command
        else {
            panic!("not export add");
        };
        assert_eq!(a.num_queues, None);
        assert!(add(&["--nbd", "--num-queues", "2"]).is_err());
        assert!(add(&["--vhost-user", "s", "--num-queues", "0"]).is_err());
        assert!(add(&["--vhost-user", "s", "--num-queues", "65"]).is_err());
        assert!(add(&["--vhost-user", "s", "--ublk"]).is_err());
    }
}
