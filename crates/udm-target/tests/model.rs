//! Random requests over random tables of linear, striped, zero and error targets on memory
//! devices must give the same bytes and the same success or failure (and errno) as a flat
//! per-sector reference model of the same table.

// Test helpers unwrap as the tests themselves may.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use proptest::prelude::*;
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BioFlags};
use udm_target::testing::TestContext;
use udm_types::errno::HasErrno;
use udm_types::Errno;

const DEVS: usize = 3;
const DEV_SECTORS: u64 = 256;
const SS: usize = 512;

#[derive(Debug, Clone)]
enum Seg {
    Linear {
        dev: usize,
        off: u64,
    },
    Striped {
        chunk: u64,
        stripes: Vec<(usize, u64)>,
    },
    Zero,
    Error,
}

#[derive(Debug, Clone)]
struct Line {
    len: u64,
    seg: Seg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    Dev(usize, u64),
    Zero,
    Error,
}

fn line_strategy() -> impl Strategy<Value = Line> {
    prop_oneof![
        (1u64..64, 0..DEVS, any::<u64>()).prop_map(|(len, dev, o)| Line {
            len,
            seg: Seg::Linear {
                dev,
                off: o % (DEV_SECTORS - len + 1),
            },
        }),
        (
            1u64..=3,
            1u64..=8,
            1u64..=4,
            prop::collection::vec((0..DEVS, any::<u64>()), 3)
        )
            .prop_map(|(n, chunk, per, picks)| {
                let width = chunk * per;
                let stripes = picks
                    .into_iter()
                    .take(n as usize)
                    .map(|(d, o)| (d, o % (DEV_SECTORS - width + 1)))
                    .collect();
                Line {
                    len: width * n,
                    seg: Seg::Striped { chunk, stripes },
                }
            }),
        (1u64..32).prop_map(|len| Line {
            len,
            seg: Seg::Zero
        }),
        (1u64..32).prop_map(|len| Line {
            len,
            seg: Seg::Error
        }),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Read(u64, u64),
    Write(u64, u64, u8),
    Discard(u64, u64),
    WriteZeroes(u64, u64),
    Flush,
}

fn op_strategy() -> impl Strategy<Value = (Op, bool, bool)> {
    let range = || (0u64..400, 1u64..80);
    (
        prop_oneof![
            range().prop_map(|(s, n)| Op::Read(s, n)),
            (range(), any::<u8>()).prop_map(|((s, n), b)| Op::Write(s, n, b)),
            range().prop_map(|(s, n)| Op::Discard(s, n)),
            range().prop_map(|(s, n)| Op::WriteZeroes(s, n)),
            Just(Op::Flush),
        ],
        any::<bool>(),
        any::<bool>(),
    )
}

struct Model {
    lines: Vec<(u64, Line)>,
    size: u64,
    devs: Vec<Vec<u8>>,
}

impl Model {
    fn new(lines: &[Line]) -> Self {
        let mut start = 0;
        let mut out = Vec::new();
        for l in lines {
            out.push((start, l.clone()));
            start += l.len;
        }
        Model {
            lines: out,
            size: start,
            devs: vec![vec![0u8; DEV_SECTORS as usize * SS]; DEVS],
        }
    }

    fn table_text(&self) -> String {
        let mut t = String::new();
        for (start, l) in &self.lines {
            let params = match &l.seg {
                Seg::Linear { dev, off } => format!("linear d{dev} {off}"),
                Seg::Striped { chunk, stripes } => {
                    let mut s = format!("striped {} {chunk}", stripes.len());
                    for (d, o) in stripes {
                        s.push_str(&format!(" d{d} {o}"));
                    }
                    s
                }
                Seg::Zero => "zero".into(),
                Seg::Error => "error".into(),
            };
            t.push_str(&format!("{start} {} {params}\n", l.len));
        }
        t
    }

    fn dest(&self, sector: u64) -> Dest {
        for (start, l) in &self.lines {
            if sector < start + l.len {
                let rel = sector - start;
                return match &l.seg {
                    Seg::Linear { dev, off } => Dest::Dev(*dev, off + rel),
                    Seg::Striped { chunk, stripes } => {
                        let n = stripes.len() as u64;
                        let c = rel / chunk;
                        let s = (c % n) as usize;
                        let (d, o) = stripes[s];
                        Dest::Dev(d, o + (c / n) * chunk + rel % chunk)
                    }
                    Seg::Zero => Dest::Zero,
                    Seg::Error => Dest::Error,
                };
            }
        }
        unreachable!("sector {sector} beyond the model")
    }

    fn sector_mut(&mut self, dev: usize, s: u64) -> &mut [u8] {
        let o = s as usize * SS;
        &mut self.devs[dev][o..o + SS]
    }

    /// Applies `op`; returns the expected errno (None = success) and, for reads, the data.
    fn apply(&mut self, op: &Op) -> (Option<Errno>, Option<Vec<u8>>) {
        let (s, n) = match *op {
            Op::Flush => return (None, None),
            Op::Read(s, n) | Op::Write(s, n, _) | Op::Discard(s, n) | Op::WriteZeroes(s, n) => {
                (s, n)
            }
        };
        if s > self.size || n > self.size - s {
            let e = if matches!(op, Op::Read(..)) {
                Errno::EINVAL
            } else {
                Errno::ENOSPC
            };
            return (Some(e), None);
        }
        let mut err = None;
        let mut data = Vec::new();
        for i in 0..n {
            let d = self.dest(s + i);
            match (op, d) {
                (Op::Read(..), Dest::Dev(dev, ds)) => {
                    data.extend_from_slice(self.sector_mut(dev, ds));
                }
                (Op::Read(..), Dest::Zero) => data.extend_from_slice(&[0u8; SS]),
                (Op::Write(_, _, b), Dest::Dev(dev, ds)) => {
                    let b = *b;
                    self.sector_mut(dev, ds).fill(b.wrapping_add(i as u8));
                }
                (Op::Discard(..) | Op::WriteZeroes(..), Dest::Dev(dev, ds)) => {
                    self.sector_mut(dev, ds).fill(0);
                }
                (Op::Write(..) | Op::Discard(..), Dest::Zero) => {}
                (Op::WriteZeroes(..), Dest::Zero | Dest::Error) => {
                    err.get_or_insert(Errno::EOPNOTSUPP);
                }
                (_, Dest::Error) => {
                    err.get_or_insert(Errno::EIO);
                }
                (Op::Flush, _) => {}
            }
        }
        (err, err.is_none().then_some(data))
    }
}

fn run(lines: Vec<Line>, ops: Vec<(Op, bool, bool)>) -> Result<(), TestCaseError> {
    let mut model = Model::new(&lines);
    let mut ctx = TestContext::new();
    let mems: Vec<Arc<MemDevice>> = (0..DEVS)
        .map(|i| ctx.add_mem(&format!("d{i}"), DEV_SECTORS))
        .collect();
    let table = ctx
        .build(&model.table_text())
        .map_err(|e| TestCaseError::fail(format!("{e}\n{}", model.table_text())))?;
    prop_assert_eq!(table.size(), model.size);
    for (op, fua, preflush) in &ops {
        let mut flags = BioFlags::empty();
        if *fua {
            flags |= BioFlags::FUA;
        }
        if *preflush {
            flags |= BioFlags::PREFLUSH;
        }
        let (want_err, want_data) = model.apply(op);
        let mut buf = Vec::new();
        let got = match *op {
            Op::Read(s, n) => {
                buf = vec![0xeeu8; n as usize * SS];
                table.submit(Bio::read(s, &mut buf).with_flags(flags))
            }
            Op::Write(s, n, b) => {
                let data: Vec<u8> = (0..n)
                    .flat_map(|i| vec![b.wrapping_add(i as u8); SS])
                    .collect();
                table.submit(Bio::write(s, &data).with_flags(flags))
            }
            Op::Discard(s, n) => table.submit(Bio::discard(s, n).with_flags(flags)),
            Op::WriteZeroes(s, n) => table.submit(Bio::write_zeroes(s, n).with_flags(flags)),
            Op::Flush => table.submit(Bio::flush()),
        };
        prop_assert_eq!(
            got.as_ref().err().map(|e| e.errno()),
            want_err,
            "op {:?} result {:?}",
            op,
            got
        );
        if let Some(d) = want_data {
            if matches!(op, Op::Read(..)) {
                prop_assert!(buf == d, "read {:?} returned other bytes", op);
            }
        }
        for (i, m) in mems.iter().enumerate() {
            prop_assert!(
                m.contents() == model.devs[i],
                "device d{} differs after {:?}",
                i,
                op
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn table_matches_flat_model(
        lines in prop::collection::vec(line_strategy(), 1..6),
        ops in prop::collection::vec(op_strategy(), 1..40),
    ) {
        run(lines, ops)?;
    }
}
