//! Runs a write history through the era target on image files, printing the status line after
//! each step, for the vmlab cross-check with the kernel's dm-era (tests/vmlab/era-crosscheck.sh
//! runs the same history in the guest):
//!
//!   era-tool META ORIGIN BLOCK_SECTORS 'w3 w5 c w5 t d r w1'
//!
//! `wN` writes 4 KiB at the start of era block N and flushes (as the guest's `dd conv=fsync`:
//! each write's mark is committed on its own, as in the kernel), `c` checkpoint, `t`
//! take_metadata_snap, `d` drop_metadata_snap, `r` suspend and resume. Every step but a write
//! prints `STATUS <line>`; the device is suspended at the end (as `dmsetup remove` does), which
//! commits.

use std::sync::Arc;

use udm_io::backend::file::FileDevice;
use udm_io::{Bio, BlockDevice};
use udm_target::testing::TestContext;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [meta, origin, bs, history] = args.as_slice() else {
        return Err("usage: era-tool META ORIGIN BLOCK_SECTORS HISTORY".into());
    };
    let bs: u64 = bs.parse()?;
    let mut ctx = TestContext::new();
    let env = Arc::new(udm_target::TargetEnv::default());
    ctx.set_env(env.clone());
    ctx.add_device("meta", Arc::new(FileDevice::open(meta.as_ref(), false)?));
    let origin = Arc::new(FileDevice::open(origin.as_ref(), false)?);
    let size = origin.size();
    ctx.add_device("origin", origin);
    let t = ctx.build(&format!("0 {size} era meta origin {bs}"))?;
    t.preresume()?;
    t.resume();
    let meta_id = ctx.device("meta").ok_or("no meta device")?.id;
    // The digest a step (or a status) kicked off has finished before the next step, as the
    // kernel's worker has between two commands of the guest's shell.
    let settle = || {
        if let Some(s) = udm_target::era::shared_metadata(&env, meta_id) {
            s.wait_digested(std::time::Duration::from_secs(5));
        }
    };
    // ERA_TOOL_DUMP=FILE appends the metadata's first 160 blocks to FILE after each status,
    // to compare block by block with the kernel's (the guest can dd its metadata the same way).
    let dump = std::env::var_os("ERA_TOOL_DUMP");
    let status = || -> Result<(), Box<dyn std::error::Error>> {
        settle();
        println!("STATUS {}", t.status_lines()[0].params);
        if let Some(d) = &dump {
            use std::io::Write;
            let data = std::fs::read(meta)?;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(d)?;
            f.write_all(&data[..data.len().min(160 * 4096)])?;
        }
        settle();
        Ok(())
    };
    status()?;
    let msg = |m: &str| t.message(0, &[m.to_string()]).map(|_| ());
    for step in history.split_whitespace() {
        match step {
            "c" => msg("checkpoint")?,
            "t" => msg("take_metadata_snap")?,
            "d" => msg("drop_metadata_snap")?,
            "r" => {
                t.presuspend();
                t.postsuspend();
                t.preresume()?;
                t.resume();
            }
            w => {
                let block: u64 = w
                    .strip_prefix('w')
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| format!("bad step {w:?}"))?;
                // As the guest's `dd conv=fsync`: the write, then a flush.
                t.submit(Bio::write(block * bs, &[0x5a; 4096]))?;
                t.submit(Bio::flush())?;
                settle();
                continue;
            }
        }
        status()?;
    }
    t.presuspend();
    t.postsuspend();
    Ok(())
}
